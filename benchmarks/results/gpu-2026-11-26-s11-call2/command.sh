# Session 11, call 2 (fresh H100, 240 s limit; carry .whl .devdata). Timed out (rc 124): the teacher alone took 108 s
# and the ~25 s of setup before the orchestrator's clock starts was not budgeted; only orchestrator.log came back.
bash benchmarks/gpu_session.sh $OUT 215 --bf16 --only sst2b128-dense s11-short-layerwise-seed42
