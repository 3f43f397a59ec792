#!/usr/bin/env bash
# The suite's power, measured the same way before and after a change to the tests (issue 23; figures in the notes):
#   devtools/measure_suite.sh coverage   branch coverage of the service's modules (every top-level *.py) over the
#                                        whole suite as `make test` runs it, gunicorn and every other Python process
#                                        the tests start included (coverage's patch = subprocess, fork, _exit)
#   devtools/measure_suite.sh mutation   mutmut's score for crypto.py, api.py and admission.py against the tests not
#                                        marked e2e ([tool.mutmut] in pyproject.toml), at most MUTATION_TIMEOUT s
# Both are slow (minutes) and CPU-heavy: `make test` does not run them. Results go to build/measure/.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PY:-$ROOT/.venv/bin/python}
OUT=$ROOT/build/measure
mkdir -p "$OUT"

coverage() {
    rm -f "$OUT"/.coverage*
    modules=$(ls ./*.py | sed "s|^\./|$ROOT/|" | paste -sd, -)
    cat > "$OUT/coveragerc" <<RC
[run]
branch = True
parallel = True
data_file = $OUT/.coverage
include = $modules
patch = subprocess, fork, _exit
RC
    # As `make test` runs pytest (its PYTEST_PLUGINS), under coverage.
    PYTEST_PLUGINS=tests.tools COVERAGE_RCFILE="$OUT/coveragerc" \
        "$PY" -m coverage run -m pytest -q -p no:cacheprovider -p devtools.coverage_env "$@" \
        > "$OUT/coverage-pytest.log" 2>&1 || echo "pytest failed; see $OUT/coverage-pytest.log" >&2
    tail -3 "$OUT/coverage-pytest.log"
    COVERAGE_RCFILE="$OUT/coveragerc" "$PY" -m coverage combine -q
    COVERAGE_RCFILE="$OUT/coveragerc" "$PY" -m coverage report --precision=1 > "$OUT/coverage.txt"
    COVERAGE_RCFILE="$OUT/coveragerc" "$PY" -m coverage json -q -o "$OUT/coverage.json"
    "$PY" - "$OUT/coverage.json" <<'PYTHON'
import json, sys
totals = json.load(open(sys.argv[1]))["totals"]
print(f"coverage: {totals['percent_covered']:.2f}% (statements {totals['covered_lines']}/{totals['num_statements']},"
      f" branches {totals['covered_branches']}/{totals['num_branches']})")
PYTHON
}

mutation() {
    # mutmut copies only what [tool.mutmut] lists: a module it does not copy fails every test's import, a file it
    # does not copy fails the tests that read it (schemathesis.toml did once).
    for file in $(git ls-files | grep -v / | grep -vx pyproject.toml); do
        grep -q "\"$file\"" pyproject.toml || { echo "[tool.mutmut] source_paths or also_copy lacks $file" >&2; exit 1; }
    done
    rm -rf mutants
    # mutmut's own `run` command, without its click context: the app asks click whether the `flask` command loads
    # it (app._finding_commands), and under `mutmut run` the answer would be mutmut's.
    timeout "${MUTATION_TIMEOUT:-3600}" "$PY" -c "from mutmut.__main__ import _run; _run((), ${MUTATION_CHILDREN:-2})" \
        > "$OUT/mutmut-run.log" 2>&1 || echo "mutmut run ended with $? (124: the time bound)" >&2
    "$PY" -m mutmut results --all true > "$OUT/mutmut-results.txt" 2>&1 || true
    "$PY" - "$OUT/mutmut-results.txt" <<'PYTHON'
import collections, sys
counts = collections.Counter(line.rsplit(": ", 1)[1].strip() for line in open(sys.argv[1]) if ": " in line)
killed = counts["killed"] + counts["timeout"] + counts["segfault"]
judged = killed + counts["survived"] + counts["suspicious"]
print(f"mutation: {killed}/{judged} killed = {100 * killed / max(judged, 1):.1f}% ({dict(counts)})")
PYTHON
}

case "${1:-}" in
    coverage) shift; coverage "$@" ;;
    mutation) mutation ;;
    *) echo "usage: $0 coverage|mutation" >&2; exit 2 ;;
esac
