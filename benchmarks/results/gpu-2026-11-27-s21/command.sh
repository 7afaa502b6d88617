# Session 21 (H200, 600 s limit, 496 s used; carry .whl .devdata; commit 370bcfa):
bash benchmarks/gpu_session.sh $OUT 550 --bf16 --grace 30 --only squad-dense s16-squad-gmp-20ep s21-squad-gmp-20ep-global s21-squad-gmp-20ep-lr8e-4
