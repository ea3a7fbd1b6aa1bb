"""The kit as a pytest module: `pytest --pyargs memplug.testing --memplug-backend NAME`.

Options come from `memplug.testing.plugin`; without `--memplug-backend` / `--memplug-check-rule`
every test here is skipped.
"""
import pytest

PLUGIN_HINT = ("pass --memplug-backend NAME or --memplug-check-rule NAME (if pytest does not know these "
               "options, add -p memplug.testing.plugin)")


def _option(config, name):
    try:
        return config.getoption(name)
    except ValueError:  # the plugin is not loaded
        return None


def pytest_generate_tests(metafunc):
    config = metafunc.config
    if "backend_case" in metafunc.fixturenames:
        cases = []
        for backend in _option(config, "memplug_backend") or []:
            from memplug.testing import LAWS
            from memplug.rules import available_rules, get_rule
            from memplug.registry import get_backend
            b = get_backend(backend)  # an unknown name fails here, at collection, with the registered names
            if not b.available():
                cases.append(pytest.param(None, id=f"{backend}-unavailable", marks=pytest.mark.skip(
                    reason=f"backend {backend!r} is not available on this machine")))
                continue
            rules = _option(config, "memplug_rule") or [r for r in available_rules() if b.supports_rule(get_rule(r))]
            for rule in rules:
                for law in _option(config, "memplug_law") or list(LAWS):
                    cases.append(pytest.param((backend, rule, law), id=f"{backend}-{rule}-{law}"))
        metafunc.parametrize("backend_case", cases or [pytest.param(None, id="no-backend")])
    if "rule_case" in metafunc.fixturenames:
        cases = []
        for rule in _option(config, "memplug_check_rule") or []:
            from memplug.testing import RULE_LAWS
            for law in [law for law in (_option(config, "memplug_law") or RULE_LAWS) if law in RULE_LAWS]:
                cases.append(pytest.param((rule, law), id=f"{rule}-{law}"))
        metafunc.parametrize("rule_case", cases or [pytest.param(None, id="no-rule")])


def _common(config):
    kw = {"max_examples": _option(config, "memplug_max_examples")}
    if _option(config, "memplug_dtype"):
        kw["dtypes"] = _option(config, "memplug_dtype")
    return kw


def test_backend_law(backend_case, request):
    if backend_case is None:
        pytest.skip(PLUGIN_HINT)
    from memplug.testing import check_backend
    backend, rule, law = backend_case
    report = check_backend(backend, rules=[rule], laws=[law], device=_option(request.config, "memplug_device"),
                           **_common(request.config))
    skipped = [r.status for r in report.results if r.status.startswith("not applicable")]
    if skipped:
        pytest.skip(skipped[0])


def test_rule_law(rule_case, request):
    if rule_case is None:
        pytest.skip(PLUGIN_HINT)
    from memplug.testing import check_rule
    rule, law = rule_case
    check_rule(rule, laws=[law], **_common(request.config))
