"""The one Registry (r1_mm.core.registry): duplicates refused, lazy entries imported on get only,
did-you-mean and the list of known names in the unknown-name error."""

import sys

import pytest

from r1_mm.core.registry import DuplicateNameError, Registry, RegistryError, UnknownNameError, suggest


def test_register_as_decorator_and_as_call():
    reg: Registry = Registry("widget")

    @reg.register("a")
    def a():
        return 1

    reg.register("b", len, origin="builtin len")
    assert reg.get("a") is a and reg.get("b") is len
    assert reg.names() == ["a", "b"] and "a" in reg and "c" not in reg
    assert reg.origin("a").endswith("test_register_as_decorator_and_as_call.<locals>.a")
    assert reg.origin("b") == "builtin len" and reg.origin("c") == ""


def test_duplicate_refused_unless_replace():
    reg: Registry = Registry("widget")
    reg.register("a", 1)
    with pytest.raises(DuplicateNameError, match="widget 'a' is already registered"):
        reg.register("a", 2)
    assert reg.get("a") == 1
    reg.register("a", 2, replace=True)
    assert reg.get("a") == 2
    with pytest.raises(DuplicateNameError):
        reg.add_lazy("a", "some.module:thing")


def test_unknown_name_suggests_or_lists_known_names():
    reg: Registry = Registry("rollout.engine")
    for name in ("hf", "vllm_pool", "vllm_colocate"):
        reg.register(name, object())
    with pytest.raises(UnknownNameError, match=r"unknown rollout.engine 'vllm_colocated'; did you mean 'vllm_colocate'\?"):
        reg.get("vllm_colocated")
    with pytest.raises(UnknownNameError, match=r"unknown rollout.engine 'zzz'; known: hf, vllm_colocate, vllm_pool$"):
        reg.get("zzz")
    assert issubclass(UnknownNameError, ValueError) and issubclass(UnknownNameError, LookupError)


def test_suggest():
    assert suggest("acuracy", ["accuracy", "format"]) == "; did you mean 'accuracy'?"
    assert suggest("zzz", ["b", "a"]) == "; known: a, b"
    assert suggest("zzz", ["b", "a"], listing="valid keys") == "; valid keys: a, b"
    assert suggest("zzz", ["b", "a"], listing=None) == ""


def test_lazy_entry_is_imported_on_get_only(tmp_path, monkeypatch):
    package = tmp_path / "r1mm_lazy_probe"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "engine.py").write_text("ENGINE = 'the probe engine'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg: Registry = Registry("probe", lazy={"probe": "r1mm_lazy_probe.engine:ENGINE"})
    reg.add_lazy("absent", "r1mm_lazy_probe.engine:NOPE")
    try:
        assert "probe" in reg and reg.names() == ["absent", "probe"]
        assert "r1mm_lazy_probe.engine" not in sys.modules  # known by name, not imported
        assert reg.origin("probe") == ""
        assert reg.get("probe") == "the probe engine"
        assert "r1mm_lazy_probe.engine" in sys.modules and reg.origin("probe") == "r1mm_lazy_probe.engine:ENGINE"
        with pytest.raises(RegistryError, match="probe 'absent': module r1mm_lazy_probe.engine has no 'NOPE'"):
            reg.get("absent")
        with pytest.raises(DuplicateNameError):  # a lazy name is taken before it is loaded
            reg.register("absent", 1)
        with pytest.raises(RegistryError, match="'package.module:attribute'"):
            reg.add_lazy("other", "r1mm_lazy_probe.engine")
    finally:
        for name in ("r1mm_lazy_probe", "r1mm_lazy_probe.engine"):
            sys.modules.pop(name, None)


def test_rollout_engines_are_lazy():
    """Importing the engine interface imports no engine: hf and the vLLM ones load when asked for."""
    import subprocess

    code = ("import sys; from r1_mm.rollout.engines import ENGINES; "
            "assert ENGINES.names() == ['hf', 'vllm_colocate', 'vllm_pool'], ENGINES.names(); "
            "assert not any(m in sys.modules for m in ('r1_mm.rollout.hf', 'r1_mm.rollout.vllm_colocate', 'vllm')); "
            "ENGINES.get('hf'); assert 'r1_mm.rollout.hf' in sys.modules and 'vllm' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_one_did_you_mean():
    """Every "did you mean" goes through core.registry.suggest: no other module calls difflib."""
    from .conftest import REPO

    users = sorted(str(f.relative_to(REPO)) for f in (REPO / "r1_mm").rglob("*.py") if "difflib" in f.read_text())
    assert users == ["r1_mm/core/registry.py"]


def test_each_lazy_engine_names_its_engine_class():
    """LAZY_ENGINES names classes by string: each must load, be a RolloutEngine and carry its own name."""
    from r1_mm.rollout.base import RolloutEngine
    from r1_mm.rollout.engines import ENGINES, LAZY_ENGINES

    for name in LAZY_ENGINES:
        engine = ENGINES.get(name)
        assert issubclass(engine, RolloutEngine) and engine.name == name
