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


def test_a_listed_mutant_the_code_no_longer_makes_is_stale():
    """A survivors-file name in a module mutmut has generated, but not among its mutants, is stale; names in modules
    without results (not generated here) and a package's __init__ mutants (named without __init__) are judged right."""
    modules = {"p.m": {"p.m.x_f__mutmut_1": 0, "p.m.xǁC.g__mutmut_1": 0},
               "p.__init__": {"p.x_h__mutmut_1": None}}
    equivalent = {"p.m.x_f__mutmut_1": "r", "p.m.x_f__mutmut_2": "r", "p.m.xǁC.g__mutmut_1": "r",
                  "p.m.xǁC.g__mutmut_9": "r", "p.x_h__mutmut_1": "r", "p.x_h__mutmut_2": "r",
                  "p.other.x_k__mutmut_1": "r"}
    assert mutation.stale_entries(modules, equivalent) == ["p.m.x_f__mutmut_2", "p.m.xǁC.g__mutmut_9",
                                                           "p.x_h__mutmut_2"]
