"""A prepared GPU check: the machine, correctness in float32, bfloat16, float16 and a float32 LLM with float16
encoders (the last two with flash attention off, as on a V100), per-request efficiency and memory, then the job and training where Ray is installed, in one short run
(at most TOTAL_BUDGET_S on a GPU). Errors are failures: a failed check, a non-finite score or an error row fails it.

    python -m benchmarks.gpu_wheels                               # here, with network: the .whl/ folder (once)
    python -m benchmarks.gpu_check --out DIR                      # needs an NVIDIA GPU
    python -m benchmarks.gpu_check --out DIR --allow-cpu --quick  # the same steps on CPU at tiny sizes (CI)

It first installs the wheels of .whl/ that fit the interpreter (`gpu_wheels.install`: what the lent GPU
machine's image lacks); steps whose modules are absent (Ray, CTranslate2) are reported `absent`. The job and
training steps also need `python -m jobs.samples` and `python -m jobs.packs whisper-base whisper-tiny.en`; the
model steps use random weights and need no pack. Writes DIR/gpu_check.json and DIR/gpu_check.md (rewritten after
each step) and prints the JSON report last. Steps run in order of value, each in its own process under its own
time budget: one over it is killed with everything it started, reported as cut with what it had measured so far,
and the steps after it still run. A step's output is in DIR/logs/STEP.log. benchmarks/README.md: how to run it
on the lent machine.
"""
