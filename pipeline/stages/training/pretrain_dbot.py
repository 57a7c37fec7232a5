"""pretrain_dbot: one stage of the dBOT chain (the pretrain node with --method dbot).

Stage k's student is freshly initialised (seed 1000 x S + k) and distils the teacher made by
teacher_swap@seed<S>-<chain>_stage<k>.
Tiny run: python -m pipeline.stages.training.pretrain_dbot --preset tiny --stage random_stage0
"""
from pipeline.stages.training.pretrain import main

if __name__ == "__main__":
    main(method="dbot")
