"""Solving PuLP integer programs honestly: HiGHS when installed, CBC otherwise, a time limit, and
the solver's own status and optimality gap.

PuLP's `LpStatus` says "Optimal" even when the solver stopped at its time limit with a merely
feasible solution, so the status and gap are read from HiGHS itself (its model status and
mip_gap) or, for CBC, from PuLP's solution status (optimal vs integer-feasible; no gap).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pulp


HIGHS_SOLUTION_FEASIBLE = 2  # HiGHS's kSolutionStatusFeasible: an integer solution is in hand


@dataclass(frozen=True)
class SolveResult:
    solver: str
    status: str  # "optimal", "time limit (feasible)", "infeasible", ...
    gap: float | None  # relative MIP gap when the solver reports it
    seconds: float

    @property
    def proven_optimal(self) -> bool:
        return self.status == "optimal"


def available_solver() -> str:
    return "HiGHS" if "HiGHS" in pulp.listSolvers(onlyAvailable=True) else "CBC"


def solve(problem: pulp.LpProblem, time_limit: float, gap: float = 1e-4) -> SolveResult:
    started = time.perf_counter()
    name = available_solver()
    if name == "HiGHS":
        with _native_stdout_silenced():  # HiGHS prints its banner from C++ even with msg=False
            problem.solve(pulp.HiGHS(msg=False, timeLimit=time_limit, gapRel=gap))
        model = problem.solverModel
        info = model.getInfo()
        status = model.modelStatusToString(model.getModelStatus()).lower()
        mip_gap = float(info.mip_gap)
        stopped = "time limit (feasible)" if info.primal_solution_status == HIGHS_SOLUTION_FEASIBLE else "time limit (no solution)"
        status = {"optimal": "optimal", "time limit reached": stopped}.get(status, status)
        return SolveResult(name, status, mip_gap if mip_gap < 1e30 else None, time.perf_counter() - started)
    problem.solve(pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, gapRel=gap))
    solution = {pulp.LpSolutionOptimal: "optimal", pulp.LpSolutionIntegerFeasible: "time limit (feasible)"}
    status = solution.get(problem.sol_status, pulp.LpStatus[problem.status].lower())
    return SolveResult(name, status, 0.0 if status == "optimal" else None, time.perf_counter() - started)


@contextlib.contextmanager
def _native_stdout_silenced() -> Iterator[None]:
    """Send file descriptor 1 to /dev/null for the block: native code's prints would corrupt --json output."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
