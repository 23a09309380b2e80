"""minikd diagnose on the gallery (tests/diagnose_gallery.py): every KD loss there, correct or buggy,
PyTorch, JAX or NumPy, gets the diagnosis its entry states; the correct ones an equivalent minikd call
within 1e-10 in value and gradient."""
import json

import numpy as np
import pytest
from diagnose_gallery import GALLERY, SKIPPED

from minikd.checks import UserError
from minikd.diagnose import diagnose, parse_expect


def run(entry, **kw):
    return diagnose(entry["fn"], order=entry["order"], teacher_as=entry["teacher_as"], fixed=entry["fixed"],
                    module_init=entry["module_init"], sequence=entry["sequence"], **kw)


@pytest.mark.parametrize("entry", GALLERY, ids=[e["name"] for e in GALLERY])
def test_gallery(entry):
    d = run(entry).to_dict()
    got = d["conventions"]
    wrong = {k: (v, got.get(k)) for k, v in entry["expect"].items()
             if not (got.get(k) == v or (isinstance(v, float) and got.get(k) is not None
                                         and abs(got[k] - v) <= 1e-6 * max(abs(v), 1)))}
    assert not wrong, (entry["why"], wrong, d["findings"])
    if entry["exact"]:
        assert d["equivalent_call"] is not None, d["findings"]
        assert d["max_rel_err"]["loss"] <= 1e-10, d["max_rel_err"]
        if entry["expect"].get("gradient_exact", True) and d["max_rel_err"]["grad"] is not None:
            assert d["max_rel_err"]["grad"] <= 1e-10, d["max_rel_err"]


def test_gallery_is_complete():
    """At least 15 losses, from both frameworks, and none skipped where the framework is installed."""
    frameworks = {e["needs"] for e in GALLERY}
    assert len(GALLERY) >= 15 and {"torch", None} <= frameworks
    pytest.importorskip("jax")
    assert "jax" in frameworks and not SKIPPED
