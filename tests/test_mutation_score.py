"""scripts/mutation.py's score per module: mutants detected over those checked less the equivalent ones; a survivor
listed as "killed by NODEID" counts as detected only when that test kills it."""
import importlib.util

import pytest
from conftest import ROOT

spec = importlib.util.spec_from_file_location("mutation", ROOT / "scripts" / "mutation.py")
mutation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mutation)


def test_score_counts_equivalents_out_and_named_slow_kills_in():
    codes = {"m.x_f__mutmut_1": 1, "m.x_f__mutmut_2": 0, "m.x_f__mutmut_3": 0, "m.x_f__mutmut_4": 0,
             "m.x_f__mutmut_5": 0, "m.x_f__mutmut_6": None, "m.x_f__mutmut_7": 33}
    equivalent = {"m.x_f__mutmut_2": "argsort's default dim", "m.x_f__mutmut_3": "killed by tests/t.py::kills",
                  "m.x_f__mutmut_4": "killed by tests/t.py::lets_live"}
    ran = []
    rows, unexplained = mutation.score({"m": codes, "n": {"n.x_g__mutmut_1": None}}, equivalent,
                                       killed=lambda name, reason: ran.append(name) or reason.endswith("::kills"))
    assert rows == [{"module": "m", "mutants": 7, "checked": 6, "detected": 2, "equivalent": 1, "survived": 2,
                     "other": 1, "score": 2 / 5}]
    assert unexplained == ["m.x_f__mutmut_4", "m.x_f__mutmut_5"] and ran == ["m.x_f__mutmut_3", "m.x_f__mutmut_4"]


def test_equivalents_file_needs_a_reason_per_mutant(tmp_path):
    listed = tmp_path / "equivalent.txt"
    listed.write_text("# comment\n\nm.x_f__mutmut_2 argsort's default dim\n")
    assert mutation.explained_survivors(listed) == {"m.x_f__mutmut_2": "argsort's default dim"}
    listed.write_text("m.x_f__mutmut_2\n")
    with pytest.raises(SystemExit, match="has no reason"):
        mutation.explained_survivors(listed)
    assert all(reason for reason in mutation.explained_survivors().values())     # the repository's own file
