#!/usr/bin/env bash
# Mutation testing of adamerge's core (merging/, components/, models/, systems/) with mutmut.
# Slow (minutes per module on 2 cores), so not part of CI. One worker, lowest CPU priority.
#
#   scripts/mutation.sh                                   # every core module
#   scripts/mutation.sh adamerge/merging/ties.py ...      # the modules named
#   scripts/mutation.sh --rev HEAD --label before ...     # a committed revision (no work-tree changes)
#   scripts/mutation.sh --max-minutes 35 ...              # stop then; unchecked mutants are reported
#   scripts/mutation.sh --label s9a --rerun-survivors ... # after writing pins: rerun that run's survivors only
#
# Prints killed / survived / equivalent per module and overall, writes
# benchmarks/results/mutation_<date>[_<label>].json and the survivors' diffs (path printed).
# Configuration: [tool.mutmut] in pyproject.toml, mutation/tests.txt (tests per module),
# mutation/equivalent.txt (equivalent mutants with the reason). See mutation/run.py.
set -euo pipefail
cd "$(dirname "$0")/.."
MUTMUT_VERSION="3.8.1"
installed="$(python3 -c 'import importlib.metadata as m; print(m.version("mutmut"))' 2>/dev/null || true)"
if [ "$installed" != "$MUTMUT_VERSION" ]; then
  python3 -m pip install -q "mutmut==$MUTMUT_VERSION"
fi
exec nice -n "${MUTATION_NICE:-19}" python3 mutation/run.py "$@"
