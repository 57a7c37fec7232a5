"""supervised: train the study's ViT with labels -> results/supervised/ (the pretrain node with --method supervised).

The supervised encoder is a reference line in the report and a stage-0 teacher of the teacher-swap study.
Tiny run: python -m pipeline.stages.training.supervised --preset tiny
"""
from pipeline.stages.training.pretrain import main

if __name__ == "__main__":
    main(method="supervised")
