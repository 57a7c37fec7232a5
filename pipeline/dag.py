"""The node table: every node of the DAG, once. Per node: its CLI module, its instances (the wildcards /
foreach keys), inputs, outputs, the params it reads, the modules it imports by name, and how it is scheduled.

Everything that names a node reads this table: the Snakefile (rules/nodes.smk makes one rule per entry), dvc.yaml's
generator (pipeline.orchestration.dvc_yaml: one stage per entry), the stage CLIs (pipeline.orchestration.cli: their
module, their declared params), the fingerprints both DAGs depend on (pipeline.orchestration.fingerprints: a
node's command, params and code) and the report (it gathers every node with `tabulated` outputs).
Paths come from pipeline.layout, called with wildcard placeholders ("{seed}", "{weights}"), so no path is
written twice.

Adding an evaluation node is its CLI module (pipeline/stages/evaluation/<name>.py) + one entry in NODES below (+ its
params section in params/base.yaml and params/schema.yaml). tests/test_dag_table.py adds a toy one.

Vocabulary:
- an *instance* is one node of the DAG: a dict of the node's wildcard values ({"seed": 0, "weights": "mae"}) and
  the fields derived from them that its inputs, params or code use ("chain", "stage", "method_also");
- an input or output *pattern* is a path with {wildcard} placeholders (Snakemake's wildcards, DVC's ${item.x}).
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from pipeline import layout

HAND_RUN = {"import_weights": "training"}    # node CLIs outside the DAG (run by hand): name -> group
TRAINING_NODES = ("pretrain", "pretrain_dbot", "supervised")     # nodes that train (threads, MLflow system metrics)
# A method's pre-training also reads these params ({method_also}; the method itself where it reads nothing more):
# RC-MAE's student is an MAE model with MAE's pixel loss.
METHOD_ALSO = {"rcmae": "mae.norm_pix_loss"}
SERIES = {"loss": ("loss", "training loss"),                  # a training node's curves: output name -> (y, title)
          "online_knn": ("online_knn_top1", "online k-NN top-1 (pretrain.online_knn)")}


@dataclass(frozen=True)
class Output:
    """One named output of a node: one pattern, or a list of them (`paths`).

    kind: "out"      a file DVC caches (weights, datasets, fine-tuned models);
          "file"     a small result DVC does not cache (analysis.json, the report's tables);
          "metrics"  a metrics.json (DVC metrics);
          "plot"     a picture (DVC plots; Snakemake's report() when `report` gives its category);
          "series"   a CSV curve, x epoch (DVC data-series plots);
    report: Snakemake report() settings of a picture (category, subcategory)."""
    paths: tuple[str, ...]
    kind: str = "out"
    report: dict | None = None

    @classmethod
    def one(cls, path, kind: str = "out", **report) -> Output:
        return cls((str(path),), kind, report or None)


@dataclass(frozen=True)
class Node:
    """One node type of the DAG (a Snakemake rule, a DVC stage)."""
    name: str
    group: str                                      # training | evaluation: pipeline/stages/<group>/<name>.py
    wildcards: tuple[str, ...]                      # "seed" first for per-seed nodes, then its key (CLI --<flag>)
    instances: Callable[[dict], list[dict]]         # params -> every instance
    inputs: Callable[[dict, dict], dict[str, list]]  # params, instance -> named input paths
    outputs: Callable[[dict], dict[str, Output]]    # params -> named output patterns
    params: tuple[str, ...]                         # params keys it reads; {method}, {chain}, {stage} from its instance
    code: tuple[str, ...] = ()                      # modules it imports by name (importlib), e.g. its method's
    flags: dict = field(default_factory=dict)       # wildcard -> CLI flag when not --<wildcard> (key: --stage)
    threads: str = "one"                            # one | train (half the cores: rules/nodes.smk)
    local: bool = False                             # Snakemake runs it on its own machine (copies a file, gathers)
    tabulated: bool = False                         # the report reads its outputs["metrics"] into summary.csv

    @property
    def module(self) -> str:
        return f"pipeline.stages.{self.group}.{self.name}"

    @property
    def keys(self) -> tuple[str, ...]:
        """The wildcards besides seed: what names one instance within a seed."""
        return tuple(w for w in self.wildcards if w != "seed")

    def node_id(self, instance: dict) -> str:
        """"knn@seed0-mae", "random_init@seed0", "report": pipeline.layout.node_id."""
        if "seed" not in self.wildcards:
            return self.name
        return layout.node_id(self.name, instance["seed"], "-".join(str(instance[k]) for k in self.keys) or None)

    def id_pattern(self) -> str:
        """The node id with wildcard placeholders: "knn@seed{seed}-{weights}"."""
        return self.node_id({w: "{" + w + "}" for w in self.wildcards})

    def args(self, instance: dict) -> list[str]:
        """The CLI arguments after --preset: --seed S and the key's flag."""
        return [a for w in self.wildcards for a in (self.flags.get(w, f"--{w}"), str(instance[w]))]

    def command(self, preset: str, instance: dict) -> str:
        return " ".join(["python", "-m", self.module, "--preset", preset, *self.args(instance)])

    def declared_params(self, instance: dict) -> list[str]:
        """Its params keys with the instance's method / chain / stage filled in (each once)."""
        return list(dict.fromkeys(key.format(**instance) for key in self.params))

    def code_roots(self, instance: dict) -> list[str]:
        """The modules it runs from: its CLI, and those it imports by name."""
        return [self.module] + [m.format(**instance) for m in self.code]

    def instance(self, params: dict, wildcards: dict) -> dict:
        """The instance with these wildcard values (a KeyError names the node if there is none)."""
        wanted = {w: str(wildcards[w]) for w in self.wildcards}
        for inst in self.instances(params):
            if {w: str(inst[w]) for w in self.wildcards} == wanted:
                return inst
        raise KeyError(f"{self.name} has no instance {wanted}")

    def job_file(self, folder: str, suffix: str) -> str:
        """results[/seed{seed}]/<folder>/<node>[/<key>]<suffix>: the pattern of its Snakemake log ("logs", ".log") or
        benchmark ("benchmarks", ".tsv")."""
        root = layout.seed_dir("{seed}") if "seed" in self.wildcards else layout.RESULTS
        key = "-".join(f"{{{k}}}" for k in self.keys)
        return f"{root / folder / (f'{self.name}/{key}' if key else self.name)}{suffix}"

    def output_paths(self, params: dict, instance: dict) -> dict[str, list[str]]:
        """Its outputs for one instance."""
        return {name: [p.format(**instance) for p in out.paths] for name, out in self.outputs(params).items()}


# ---------------------------------------------------------------- instances

def _seeds(params: dict) -> list[dict]:
    return [{"seed": s} for s in params["seeds"]]


def _per_weights(weights: Callable[[dict], list[str]], first_seed: bool = False):
    def instances(params: dict) -> list[dict]:
        seeds = params["seeds"][:1] if first_seed else params["seeds"]
        return [{"seed": s, "weights": w} for s in seeds for w in weights(params)]
    return instances


def _methods(params: dict) -> list[dict]:
    return [{"seed": s, "method": m, "method_also": METHOD_ALSO.get(m, m)}
            for s in params["seeds"] for m in layout.SINGLE_STAGE_METHODS]


def _dbot(params: dict) -> list[dict]:
    out = []
    for s in params["seeds"]:
        for key in layout.dbot_keys(params):
            chain, stage = layout.parse_dbot_key(key)
            out.append({"seed": s, "key": key, "chain": chain, "stage": stage})
    return out


def _once(params: dict) -> list[dict]:
    return [{}]


def _unless_streamed(instances: Callable[[dict], list[dict]]):
    """Nodes that read every image into memory (layout.IN_MEMORY_NODES): none on a streamed dataset."""
    return lambda params: [] if layout.streamed(params) else instances(params)


# ---------------------------------------------------------------- inputs and outputs

def _data(params: dict) -> str:
    return str(layout.dataset_path(params))


def _training_outputs(kind: str, subcategory: str | None = None) -> Callable[[dict], dict[str, Output]]:
    """A training node's outputs: encoder + sidecar, metrics, the curves, and its reconstructions (not supervised)."""
    key = {"pretrain": "{method}", "pretrain_dbot": "{key}", "supervised": None}[kind]
    method = {"pretrain": "{method}", "pretrain_dbot": "dbot", "supervised": "supervised"}[kind]

    def outputs(params: dict) -> dict[str, Output]:
        node_dir = layout.pretrain_dir(method, "{seed}", key)
        out = {"weights": Output.one(node_dir / "encoder.safetensors"),
               "meta": Output.one(node_dir / "encoder.json"),
               "metrics": Output.one(node_dir / "metrics.json", "metrics")}
        out |= {name: Output.one(node_dir / f"{name}.csv", "series") for name in SERIES}
        if subcategory:
            out["picture"] = Output.one(node_dir / "reconstruction.png", "plot", category="reconstructions",
                                        subcategory=subcategory)
        return out
    return outputs


def _pretrain_outputs(params: dict) -> dict[str, Output]:
    out = _training_outputs("pretrain", "{method}")(params)
    kept = layout.kept_epochs(params, layout.KEEPS_CHECKPOINTS[0])   # every single-stage method: pretrain.epochs
    paths = [str(layout.checkpoint_path("{method}", "{seed}", e).with_suffix(ext))
             for e in kept for ext in (".safetensors", ".json")]
    return out | ({"kept": Output(tuple(paths))} if paths else {})


def _dbot_outputs(params: dict) -> dict[str, Output]:
    out = _training_outputs("pretrain_dbot", "dbot {key}")(params)
    if params["dbot"]["carry_optimizer_state"]:
        out["optimizer"] = Output.one(layout.optimizer_path("{key}", "{seed}"))
    return out


def _dbot_inputs(params: dict, inst: dict) -> dict[str, list]:
    carried = layout.carried_optimizer(params, inst["key"], inst["seed"])
    return {"data": [_data(params)], "teacher": [str(layout.teacher_path(inst["key"], inst["seed"]))],
            "optimizer": [str(carried)] if carried else []}


def _encoder_inputs(params: dict, inst: dict) -> dict[str, list]:
    return {"data": [_data(params)], "encoder": [str(layout.weights_path(inst["weights"], inst["seed"]))]}


def _evaluation_outputs(name: str, result: str = "metrics.json", picture: str | None = None,
                        category: str | None = None) -> Callable[[dict], dict[str, Output]]:
    """results/seed<S>/<name>/<weights>/<result> (+ a picture for the Snakemake report)."""
    def outputs(params: dict) -> dict[str, Output]:
        node_dir = layout.seed_dir("{seed}") / name / "{weights}"
        main = "metrics" if result == "metrics.json" else result.split(".")[0]
        out = {main: Output.one(node_dir / result, "metrics" if main == "metrics" else "file")}
        if picture:
            out[picture.split(".")[0]] = Output.one(node_dir / picture, "plot", category=category,
                                                    subcategory="{weights}")
        return out
    return outputs


def _finetune_outputs(params: dict) -> dict[str, Output]:
    out = _evaluation_outputs("finetune", picture="curve.png", category="fine-tuning")(params)
    model = layout.finetuned_path("{weights}", "{seed}")
    return out | {"model": Output.one(model), "meta": Output.one(layout.sidecar(model))}


def _cka_inputs(params: dict, inst: dict) -> dict[str, list]:
    return {"data": [_data(params)],
            "encoders": [str(layout.weights_path(w, inst["seed"])) for w in layout.all_weights(params)]}


def tabulated_metrics(params: dict) -> list[str]:
    """Every metrics.json the report tabulates as evaluation rows: the outputs["metrics"] of each instance of every
    node marked tabulated, seed by seed."""
    return [p for s in params["seeds"] for node in NODES.values() if node.tabulated
            for inst in node.instances(params) if inst.get("seed") == s
            for p in node.output_paths(params, inst)["metrics"]]


def _report_inputs(params: dict, inst: dict) -> dict[str, list]:
    seeds = params["seeds"]
    curves = [str(p) for i in NODES["checkpoint_eval"].instances(params)
              for p in NODES["checkpoint_eval"].output_paths(params, i)["metrics"]]
    return {"pretrain": [str(p) for s in seeds for p in layout.pretrain_metrics(params, s)],
            "evaluations": tabulated_metrics(params),
            "curves": curves,
            "analyses": [str(layout.analysis_path(w, seeds[0])) for w in layout.analysis_weights(params)],
            "cka": [str(layout.cka_path(s)) for s in layout.cka_seeds(params)]}


REPORT_CATEGORIES = {"pretrain_loss": "pre-training", "online_knn": "pre-training", "checkpoint_eval": "convergence",
                     "attention_distance": "analyses", "singular_value_share": "analyses"}


def _report_outputs(params: dict) -> dict[str, Output]:
    out = {name: Output.one(path, "file") for name, path in (
        ("csv", layout.SUMMARY_CSV), ("md", layout.SUMMARY_MD), ("swap_csv", layout.RESULTS / "swap_study.csv"),
        ("spread_csv", layout.RESULTS / "swap_spread.csv"), ("claims_csv", layout.CLAIMS_CSV))}
    for name in layout.report_plots(params):
        out[f"plot_{name}"] = Output.one(layout.PLOTS_DIR / f"{name}.png", "plot",
                                         category=REPORT_CATEGORIES.get(name, "evaluation"))
    return out


def _with_params_file(node: Node) -> Node:
    """The node with one more output: params.yaml, the params it ran with, which it writes beside its first output
    (pipeline.orchestration.tracking.tracked). Declared, so that neither tool keeps a stale one; for DVC it is also
    a `cache: false` file, which keeps DVC's run-cache off for the node: a result restored from there would look
    new to DVC and old to Snakemake (whose benchmark of the node's last job would be the newer file)."""
    def outputs(params: dict) -> dict[str, Output]:
        out = node.outputs(params)
        first = next(iter(out.values())).paths[0]
        return out | {"params": Output.one(str(Path(first).parent / "params.yaml"), "file")}
    return replace(node, outputs=outputs)


# ---------------------------------------------------------------- the table

_PROBE = ("knn", "linprobe")
NODES: dict[str, Node] = {n.name: _with_params_file(n) for n in (
    Node("prepare_data", "training", (), _once, lambda p, i: {},
         lambda p: {"data": Output.one(_data(p)), "meta": Output.one(layout.sidecar(_data(p)))},
         ("data",)),
    Node("random_init", "training", ("seed",), _seeds, lambda p, i: {"data": [_data(p)]},
         lambda p: {"weights": Output.one(layout.weights_path("random_init", "{seed}")),
                    "meta": Output.one(layout.sidecar(layout.weights_path("random_init", "{seed}")))},
         ("data", "model")),
    Node("pretrain", "training", ("seed", "method"), _methods, lambda p, i: {"data": [_data(p)]}, _pretrain_outputs,
         ("data", "model", "pretrain", "{method}", "{method_also}"), code=("pipeline.methods.{method}",),
         threads="train"),
    Node("supervised", "training", ("seed",), _seeds, lambda p, i: {"data": [_data(p)]},
         _training_outputs("supervised"), ("data", "model", "pretrain", "supervised"),
         code=("pipeline.methods.supervised",), threads="train"),
    Node("teacher_swap", "training", ("seed", "key"), _dbot,
         lambda p, i: {"source": [layout.teacher_source(p, i["key"], i["seed"])]},
         lambda p: {"weights": Output.one(layout.teacher_path("{key}", "{seed}")),
                    "meta": Output.one(layout.sidecar(layout.teacher_path("{key}", "{seed}")))},
         ("data", "model", "dbot.chains.{chain}", "dbot.stage0_teacher_depth"), flags={"key": "--stage"},
         local=True),
    Node("pretrain_dbot", "training", ("seed", "key"), _dbot, _dbot_inputs, _dbot_outputs,
         ("data", "model", "pretrain", "dbot.beta", "dbot.target_norm", "dbot.teacher_final_norm", "dbot.drop_path",
          "dbot.decoder_drop_path", "dbot.carry_optimizer_state", "dbot.stages.stage{stage}"),
         code=("pipeline.methods.dbot",), flags={"key": "--stage"}, threads="train"),
    *(Node(name, "evaluation", ("seed", "weights"), _per_weights(layout.probe_weights), _encoder_inputs,
           _evaluation_outputs(name), ("data", name), tabulated=True) for name in _PROBE),
    Node("segprobe", "evaluation", ("seed", "weights"), _unless_streamed(_per_weights(layout.all_weights)),
         _encoder_inputs, _evaluation_outputs("segprobe", picture="examples.png", category="segmentation probe"),
         ("data", "segprobe"), tabulated=True),
    Node("finetune", "evaluation", ("seed", "weights"), _per_weights(layout.finetune_weights), _encoder_inputs,
         _finetune_outputs, ("data", "finetune"), threads="train", tabulated=True),
    Node("robustness", "evaluation", ("seed", "weights"),
         lambda p: _unless_streamed(_per_weights(layout.finetune_weights))(p) if p["robustness"]["enabled"] else [],
         lambda p, i: {"data": [_data(p)], "model": [str(layout.finetuned_path(i["weights"], i["seed"]))]},
         _evaluation_outputs("robustness", picture="robustness.png", category="robustness"),
         ("data", "finetune", "robustness"), tabulated=True),  # the fine-tuned model's settings, recorded with it
    Node("checkpoint_eval", "evaluation", ("seed", "weights"),
         _per_weights(layout.checkpoint_eval_weights, first_seed=True),
         lambda p, i: {"inputs": [str(x) for x in layout.checkpoint_eval_inputs(p, i["weights"], i["seed"])]},
         _evaluation_outputs("checkpoint_eval", picture="curve.png", category="convergence"),
         ("data", "knn", "linprobe", "pretrain.epochs", "pretrain.keep_every_epochs")),
    Node("analyze", "evaluation", ("seed", "weights"), _per_weights(layout.analysis_weights, first_seed=True),
         _encoder_inputs, _evaluation_outputs("analyze", "analysis.json", "attention_heads.png", "analyses"),
         ("data", "analyze")),
    Node("cka", "evaluation", ("seed",), lambda p: [{"seed": s} for s in layout.cka_seeds(p)], _cka_inputs,
         lambda p: {"cka": Output.one(layout.cka_path("{seed}"), "file"),
                    "plot": Output.one(layout.cka_path("{seed}").with_suffix(".png"), "plot", category="analyses")},
         ("data", "analyze", "dbot")),
    Node("report", "evaluation", (), _once, _report_inputs, _report_outputs,
         ("seeds", "dbot.chains", "dbot.stages", "data.dataset", "data.format", "pretrain.epochs",
          "pretrain.keep_every_epochs", "finetune.weights", "robustness.enabled"), local=True),
)}


def stage_module(name: str) -> str:
    """The module a node runs as: "pretrain" -> "pipeline.stages.training.pretrain"."""
    if name in NODES:
        return NODES[name].module
    if name in HAND_RUN:
        return f"pipeline.stages.{HAND_RUN[name]}.{name}"
    raise KeyError(f"no node CLI named {name!r}: known {', '.join([*NODES, *HAND_RUN])}")


def declared(name: str, **fields) -> list[str]:
    """The params keys node `name` reads, with its method / chain / stage filled in."""
    if "method" in fields:
        fields.setdefault("method_also", METHOD_ALSO.get(fields["method"], fields["method"]))
    return NODES[name].declared_params(fields)


def parse_node_id(node_id: str) -> tuple[Node, dict]:
    """"knn@seed0-mae" -> (the knn node, its wildcard values); the inverse of Node.node_id."""
    match = re.fullmatch(r"(?P<name>\w+)(?:@seed(?P<seed>\d+)(?:-(?P<key>.+))?)?", node_id)
    if not match or match["name"] not in NODES:
        raise KeyError(f"{node_id!r} is not a node id of the DAG")
    node = NODES[match["name"]]
    values = {"seed": int(match["seed"])} if match["seed"] is not None else {}
    if node.keys:
        values[node.keys[0]] = match["key"]
    return node, values


def instances(params: dict) -> list[tuple[Node, dict]]:
    """Every node of the DAG: (its node type, its instance), in table order."""
    return [(node, inst) for node in NODES.values() for inst in node.instances(params)]
