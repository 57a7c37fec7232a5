"""One rule per node of the node table (pipeline/dag.py): its name, wildcards, inputs (with its fingerprint),
outputs, command, threads and resources all come from its entry there, as dvc.yaml's stages do.

Rule name = node name = pipeline/stages/<group>/<name>.py; a job's log and benchmark are
results/seed<S>/{logs,benchmarks}/<node>/<key>.{log,tsv}.
"""

for node in dag.NODES.values():
    if not node.instances(PARAMS):             # e.g. robustness.enabled false, or a streamed dataset's segprobe
        continue

    rule:
        name: node.name
        input: unpack(node_inputs(node))
        output: **node_outputs(node)
        params: command=node_command(node)      # a function made now: shell: is read when a job runs, after the loop
        wildcard_constraints: **node_constraints(node)
        threads: TRAIN_THREADS if node.threads == "train" else 1
        resources: **node_resources(node)
        localrule: node.local
        conda: "envs/pipeline.yaml"
        log: node.job_file("logs", ".log")
        benchmark: node.job_file(*BENCHMARK)
        shell: "{params.command} > {log} 2>&1"
