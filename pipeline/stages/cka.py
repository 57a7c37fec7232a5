"""cka: linear CKA per layer between the study's trained encoders -> results/cka/cka.json + cka.png.

Every pair of trained encoders (the random floor excluded) is compared layer by layer on the patch tokens
of the first `analyze.images` validation images: where do the students of the dBOT chain, and the other
methods, converge? The plot shows consecutive dBOT stages and each method against the chain's last stage.
Tiny run: python -m pipeline.stages.cka --preset tiny
"""
from itertools import combinations

from pipeline import analysis, data, layout
from pipeline.checkpoint import write_json
from pipeline.cli import stage_main
from pipeline.encoder import load_encoder
from pipeline.errors import PipelineError
from pipeline.node import tracked


def trained_weights(params: dict) -> list[str]:
    return [w for w in layout.all_weights(params) if w != "random_init"]


def check(params: dict, args) -> None:
    for path in [layout.DATASET] + [layout.weights_path(w) for w in trained_weights(params)]:
        if not path.is_file():
            raise PipelineError(f"missing input {path}: run the node that makes it first")


def plotted_pairs(weights: list[str]) -> list[tuple[str, str]]:
    """Consecutive dBOT stages, and every other encoder against the chain's last stage."""
    chain = [w for w in weights if w.startswith("dbot_stage")]
    others = [w for w in weights if w not in chain]
    return list(zip(chain, chain[1:])) + [(w, chain[-1]) for w in others if chain]


def work(params: dict, args) -> None:
    prep = data.load_prepared()
    images = data.normalize(prep.val_x[:params["analyze"]["images"]], prep.mean, prep.std)
    weights = trained_weights(params)
    encoders = {w: load_encoder(layout.weights_path(w), params, prep.train_x.shape[1])[0] for w in weights}
    out = layout.RESULTS / "cka" / "cka.json"
    with tracked(params, "report", "cka", out.parent, ["seed", "analyze"]) as run:
        table = {f"{a} vs {b}": analysis.cka_per_layer(encoders[a], encoders[b], images)
                 for a, b in combinations(weights, 2)}
        analysis.plot_cka({f"{a} vs {b}": table[f"{a} vs {b}"] for a, b in plotted_pairs(weights)},
                          out.parent / "cka.png")
        write_json(out, {"settings": params["analyze"], "pairs": {k: v.tolist() for k, v in table.items()}})
        run.log_artifacts(out, out.parent / "cka.png")
    print(f"cka: {len(table)} pairs x {len(next(iter(table.values())))} layers -> {out}")


def main(argv=None) -> None:
    stage_main("cka", __doc__, lambda p: None, check, work, lambda a: "cka", argv)


if __name__ == "__main__":
    main()
