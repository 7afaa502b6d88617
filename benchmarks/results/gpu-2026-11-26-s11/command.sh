# Session 11, call 1 (H100, 600 s limit; carry .whl .devdata):
bash benchmarks/gpu_session.sh $OUT 560 --bf16 --only sst2b128-dense squad-dense s10-gmp-layerwise-seed42 s10-gmp-layerwise-seed1 s10-gmp-layerwise-seed2 s10-gmp-layerwise-seed3 s10-squad-gmp-layerwise s10-squad-obs-layerwise
