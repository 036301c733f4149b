#!/usr/bin/env bash
# The demo pipeline on the built-in corpus (docstrings of Python's standard library).
# Every step's record is kept under runs/demo/. Run through `make demo`.
#
# The story: a teacher trained from scratch, a 4x smaller student cut out of it and distilled,
# quantized to 4 bits and exported for llama.cpp. Every artifact is scored on the same held-out
# text with the same protocol, teacher and student are benchmarked side by side in one run,
# both are registered, and the promotion gate refuses the student because it is worse than the
# teacher by more than the allowed margin: the report shows the trade (size and speed against
# perplexity).
set -euo pipefail
ITERA=${ITERA:-.venv/bin/itera}
RUNS=${RUNS:-runs/demo}
REG=(--registry "$RUNS/registry.db")
EVAL=(--dataset pydocs@test --max-tokens 20000)  # one protocol for every artifact
# The demo owns $RUNS: every run starts from an empty one (itera itself never replaces an output
# without --force).
rm -rf "$RUNS"
mkdir -p "$RUNS"

echo "== 1. teacher: trained from scratch (cross-entropy, no teacher), scored as float and as GGUF F16" >&2
$ITERA distill --alpha 0 --tokenizer bpe:2048 --student itera/configs/students/demo-teacher.yaml \
    --data pydocs@train --out "$RUNS/teacher" --steps "${TEACHER_STEPS:-600}" --lr 4e-3 --warmup-steps 20 \
    --batch-size 16 --seq-len 128 --metrics-out "$RUNS/teacher.json" \
  | $ITERA evaluate "${EVAL[@]}" --metrics-out "$RUNS/teacher-eval.json" \
  | $ITERA export --format gguf --gguf-type F16 --out "$RUNS/teacher-f16.gguf" --metrics-out "$RUNS/teacher-export.json" \
  | $ITERA evaluate "${EVAL[@]}" --metrics-out "$RUNS/teacher-f16-eval.json" > /dev/null

echo "== 2. student: a quarter of the teacher (pruned, distilled) | score | GPTQ 4-bit | score | GGUF Q4_0 | score" >&2
$ITERA distill --teacher "$RUNS/teacher" --student quarter --data pydocs@train --out "$RUNS/student" \
    --steps "${STUDENT_STEPS:-120}" --lr 2e-3 --batch-size 16 --seq-len 128 --metrics-out "$RUNS/student.json" \
  | $ITERA evaluate "${EVAL[@]}" --metrics-out "$RUNS/student-eval.json" \
  | $ITERA quantize --method gptq --bits 4 --group-size 32 --calib pydocs@train --out "$RUNS/student-q4" \
      --metrics-out "$RUNS/student-q4.json" \
  | $ITERA evaluate "${EVAL[@]}" --metrics-out "$RUNS/student-q4-eval.json" \
  | $ITERA export --format gguf --gguf-type Q4_0 --out "$RUNS/student-q4.gguf" --metrics-out "$RUNS/student-export.json" \
  | $ITERA evaluate "${EVAL[@]}" --metrics-out "$RUNS/student-q4-gguf-eval.json" > /dev/null

echo "== 3. teacher F16 and student Q4_0 benchmarked side by side in llama.cpp (one run, interleaved)" >&2
$ITERA benchmark-power --compare "$RUNS/student-q4.gguf" --metrics-out "$RUNS/compare-power.json" \
    < "$RUNS/teacher-f16-eval.json" > /dev/null

echo "== 4. register both; the teacher goes live; the gate decides on the student" >&2
$ITERA registry register --name pydocs-demo --tag role=teacher --record "$RUNS/compare-power.json" "${REG[@]}" \
    > "$RUNS/teacher-register.json"
$ITERA registry register --name pydocs-demo --tag role=student --record "$RUNS/student-q4-gguf-eval.json" "${REG[@]}" \
    > "$RUNS/student-register.json"
$ITERA registry activate pydocs-demo@1 "${REG[@]}" > /dev/null
$ITERA registry mark-good pydocs-demo@1 "${REG[@]}" > /dev/null
set +e
$ITERA registry promote pydocs-demo@2 --metric perplexity --max-regression 5% "${REG[@]}" > "$RUNS/promote.json"
status=$?
set -e
if [ "$status" -eq 3 ]; then
  echo "   promotion refused (exit 3, logged in the registry's history): the teacher stays live" >&2
elif [ "$status" -ne 0 ]; then
  exit "$status"
else
  echo "   the student was promoted" >&2
fi
echo "   an operator activates the student by hand, then rolls back to last-good:" >&2
$ITERA registry activate pydocs-demo@2 "${REG[@]}" > /dev/null
$ITERA registry rollback pydocs-demo "${REG[@]}" > "$RUNS/rollback.json"
$ITERA registry compare pydocs-demo@1 pydocs-demo@2 "${REG[@]}" > "$RUNS/compare.json"
$ITERA registry history pydocs-demo "${REG[@]}" > "$RUNS/history.json"
echo "   active: $($ITERA registry resolve pydocs-demo@active "${REG[@]}")" >&2

echo "== 5. report" >&2
$ITERA report "$RUNS/teacher-register.json" "$RUNS/student-register.json" "$RUNS/teacher-eval.json" \
    "$RUNS/student-eval.json" "$RUNS/student-q4-eval.json" --out "$RUNS/report" --metrics-out "$RUNS/report.json" > /dev/null
$ITERA report "$RUNS"/*.json --out "$RUNS/report-html" --format html > /dev/null
echo "report: $RUNS/report/report.md (registry: $RUNS/registry.db; records: $RUNS/*.json)" >&2

echo "== 6. this run's figures against the ones docs/commands.md quotes" >&2
if ! "${PY:-.venv/bin/python}" scripts/demo_table.py "$RUNS" --check docs/commands.md; then
  echo "   (expected on another CPU or build, where floats are summed in another order; on the machine and" >&2
  echo "   code that wrote the docs they repeat. \`python scripts/demo_table.py $RUNS\` prints this run's block.)" >&2
fi
