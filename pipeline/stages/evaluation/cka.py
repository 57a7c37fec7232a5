"""cka: linear CKA per layer between one seed's encoders -> results/seed<S>/cka/{cka.json,cka.png}.

Encoders are compared layer by layer on the patch tokens of the first `analyze.images` validation images
(each encoder's features are computed once). Pairs:
- the teacher-swap study: at each stage, every pair of students of different dBOT chains, and the pairs of
  the chains' stage-0 teachers (row "teacher", where they are weights of the study and of equal depth);
  their mean per layer is "swap" in the JSON and the first panel of the plot;
- the first chain's consecutive stages, and every other trained encoder against the first chain's last stage.
Tiny run: python -m pipeline.stages.evaluation.cka --preset tiny
"""
from itertools import combinations

from pipeline import layout
from pipeline.checkpoint import write_json
from pipeline.errors import PipelineError
from pipeline.orchestration.cli import stage_main
from pipeline.orchestration.tracking import tracked
from pipeline.stages.evaluation.common import require_tensor


def check(params: dict, args) -> None:
    require_tensor(params, "cka")
    for path in [layout.DATASET] + [layout.weights_path(w, args.seed) for w in layout.all_weights(params)]:
        if not path.is_file():
            raise PipelineError(f"missing input {path}: run the node that makes it first")


def swap_groups(params: dict) -> dict[str, list[str]]:
    """Stage label -> the weights compared across chains at that stage ('teacher', then '0', '1', ...)."""
    chains = params["dbot"]["chains"]
    groups = {"teacher": [s for s in chains.values() if s in layout.TEACHER_SOURCES]}
    for k in layout.dbot_stages(params):
        groups[str(k)] = [layout.dbot_weights(layout.dbot_key(c, k)) for c in chains]
    return groups


def other_pairs(params: dict) -> list[tuple[str, str]]:
    """The first chain's consecutive stages, and every other trained encoder against its last stage."""
    first = next(iter(params["dbot"]["chains"]))
    chain = [layout.dbot_weights(layout.dbot_key(first, k)) for k in layout.dbot_stages(params)]
    others = [w for w in layout.all_weights(params) if not w.startswith("dbot_") and w != "random_init"]
    return list(zip(chain, chain[1:])) + [(w, chain[-1]) for w in others]


def work(params: dict, args) -> None:
    import torch

    from pipeline.data import datasets
    from pipeline.evaluation import representations
    from pipeline.models.encoder import load_encoder

    prep = datasets.load_prepared()
    images = datasets.normalize(prep.val_x[:params["analyze"]["images"]], prep.mean, prep.std)
    groups, pairs = swap_groups(params), other_pairs(params)
    needed = sorted({w for g in groups.values() for w in g} | {w for p in pairs for w in p})
    feats = {}
    for w in needed:
        encoder = load_encoder(layout.weights_path(w, args.seed), params["model"], prep.train_x.shape[1],
                               prep.train_x.shape[-1])[0]
        feats[w] = representations.layer_features(encoder, images)

    def cka(a: str, b: str) -> torch.Tensor | None:
        if len(feats[a]) != len(feats[b]):
            return None                               # encoders of different depth: no layer-wise pairing
        return torch.tensor([representations.linear_cka(x, y) for x, y in zip(feats[a], feats[b])])

    out = layout.cka_path(args.seed)
    with tracked(params, "report", layout.node_id("cka", args.seed), out.parent, ["seed", "analyze", "dbot"]) as run:
        table = {f"{a} vs {b}": cka(a, b) for a, b in pairs}
        swap = {}
        for stage, members in groups.items():
            stage_pairs = {f"{a} vs {b}": cka(a, b) for a, b in combinations(members, 2)}
            table.update(stage_pairs)
            values = [v for v in stage_pairs.values() if v is not None]
            if values:
                swap[stage] = torch.stack(values).mean(dim=0)
        table = {k: v for k, v in table.items() if v is not None}
        representations.plot_cka({f"{a} vs {b}": table[f"{a} vs {b}"] for a, b in pairs}, out.parent / "cka.png", swap)
        write_json(out, {"settings": params["analyze"], "pairs": {k: v.tolist() for k, v in table.items()},
                         "swap": {k: v.tolist() for k, v in swap.items()}})
        run.log_artifacts(out, out.parent / "cka.png")
    print(f"{layout.node_id('cka', args.seed)}: {len(table)} pairs of {len(needed)} encoders -> {out}")


def main(argv=None) -> None:
    stage_main("cka", __doc__, lambda p: None, check, work, lambda a: layout.node_id("cka", a.seed), argv)


if __name__ == "__main__":
    main()
