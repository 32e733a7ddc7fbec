"""The README's example runs as printed, and the docs stand alone (no link out of the repo)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_readme_python_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) >= 2  # the typed example, then the raw ioctl once
    scope: dict[str, object] = {}
    exec(compile("\n".join(blocks), "README.md", "exec"), scope)  # one session, as a reader
    assert scope["other_ioas"] != scope["ioas_id"]


def test_readme_uses_the_typed_layer() -> None:
    text = (ROOT / "README.md").read_text()
    for call in ("fd.ioas_alloc()", "fd.ioas_map(", "fd.hwpt_alloc(", "fd.attach("):
        assert call in text, call
    assert text.count("fd.ioctl(") == 1  # the raw bytes, shown once


def test_docs_point_nowhere_outside() -> None:
    for path in DOCS:
        text = path.read_text()
        for outside in ("../shared", "/work/", "DESIGN.md"):
            assert outside not in text, f"{path.relative_to(ROOT)} refers to {outside}"
        for link in re.findall(r"\]\(([^)#]+)\)", text):
            if "://" not in link:
                assert (path.parent / link).exists(), f"{path.name}: broken link {link}"


def test_help_shows_every_public_attribute() -> None:
    """``help()`` on Machine, Vm and the fd documents every public method and attribute."""
    import inspect

    import iommufd_model as im
    from iommufd_model.vmm import Vm

    machine = im.Machine.build(iommus=["mock"])
    fd = machine.new_process().open_iommufd()
    vm = Vm(machine)
    try:
        for obj in (machine, vm, fd):
            cls = type(obj)
            for name, member in inspect.getmembers(cls):
                if not name.startswith("_") and callable(member):
                    assert inspect.getdoc(member), f"{cls.__name__}.{name} has no docstring"
            for name in vars(obj):
                if not name.startswith("_"):
                    assert name in (cls.__doc__ or ""), f"{cls.__name__}.{name} undocumented"
    finally:
        vm.close()
        fd.close()


def test_uapi_records_have_docstrings() -> None:
    from iommufd_model.uapi import iommufd as U
    from iommufd_model.uapi.codec import UStruct

    records = [c for c in vars(U).values() if isinstance(c, type) and issubclass(c, UStruct)]
    assert len(records) > 30
    missing = [c.__name__ for c in records if c is not UStruct and not c.__doc__]
    assert not missing, missing
