# Session 14 (H200, 600 s limit; carry .whl .devdata; commit 8ea4469):
bash benchmarks/gpu_session.sh $OUT 560 --bf16 --grace 25 --only sst2b128-dense s10-gmp-layerwise-seed42 s10-gmp-layerwise-seed1 s10-gmp-layerwise-seed2 s10-gmp-layerwise-seed3
