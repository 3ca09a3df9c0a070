"""Compound AI, part 2 (lesson 16): programs of LLM calls with semantic variables (Parrot).

    graph.py      `Program`, `Call`, `Var`: a DAG of calls whose prompts name other calls' outputs;
                  validation (undefined variables, cycles, limits) with errors naming the field
    scheduler.py  objective deduction (critical path -> latency priority) and the ready-set step
    runner.py     in process: `run_program` (the DAG at once on the engine), `run_sequential` (one by one)
    client.py     over HTTP: `ProgramClient` (POST /v1/programs), `SequentialClient` (the OpenAI API,
                  one call at a time)
    examples.py   the map-reduce summarisation program of the benchmark and the lab
"""
from .graph import Call, Program, ProgramError, ProgramLimits, Var
from .runner import CallResult, ProgramResult, run_program, run_sequential
from .scheduler import Objective, ProgramState, deduce_objectives, ready_set, topological_order

__all__ = ["Call", "CallResult", "Objective", "Program", "ProgramError", "ProgramLimits", "ProgramResult",
           "ProgramState", "Var", "deduce_objectives", "ready_set", "run_program", "run_sequential",
           "topological_order"]
