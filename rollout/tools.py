"""Tools a policy calls in the middle of a trajectory, and what each call gives back.

A tool takes the text of a call (what the policy wrote between `call_open` and `call_close`) and
returns a `ToolOutput`. The built-in `python` tool runs the call as a Python program in the process
sandbox of `verifiers/sandbox.py` (own uid, no network, read-only filesystem, CPU, memory, process and
output limits) and observes its stdout, or the end of its traceback, or the limit that stopped it. A
user's tool is a dotted path `package.module:function` to a function of the call's text returning the
observation's text. Whatever a call does, `call_tool` returns an observation: a crashing, looping,
flooding or forking program is the policy's mistake and is shown to it as an error; a tool that raises
inside Orchard is reported with outcome "raised" (counted and logged by the run) and observed as an
error too. Nothing a call does stops the run.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from orchard.config import MultiTurnConfig, tool_name
from orchard.verifiers.sandbox import Limit, SandboxLimits, run_sandboxed

#: What a call's outcome may be: "ok"; "error" (the program failed: exception, non-zero exit);
#: "limit" (a sandbox limit stopped it); "raised" (the tool itself raised: Orchard's problem, not the policy's).
TOOL_OUTCOMES = ("ok", "error", "limit", "raised")


@dataclass(frozen=True)
class ToolOutput:
    """What one call observed: the text for the policy (before `tool_output_chars` is applied), the
    outcome (one of TOOL_OUTCOMES) and, for "raised", what went wrong."""

    text: str
    outcome: str = "ok"
    error: str | None = None


class ToolError(ValueError):
    """A configured tool cannot be loaded; the message names the tool and why."""


@dataclass(frozen=True)
class PythonTool:
    """The call is a Python program; its stdout is the observation (stderr's last lines when it fails)."""

    limits: SandboxLimits
    name: str = "python"

    def __call__(self, code: str) -> ToolOutput:
        result = run_sandboxed(code, limits=self.limits)
        if result.limit is not None:
            return ToolOutput(f"error: stopped by the {_LIMIT_WORDS[result.limit]}", outcome="limit")
        if result.exit_code != 0:
            lines = result.stderr.strip().splitlines()
            reason = lines[-1] if lines else f"exit status {result.exit_code}, signal {result.signal}"
            return ToolOutput(f"error: {reason}", outcome="error")
        return ToolOutput(result.stdout.strip())


_LIMIT_WORDS = {
    Limit.TIMEOUT: "time limit",
    Limit.CPU: "CPU time limit",
    Limit.MEMORY: "memory limit",
    Limit.OUTPUT: "output limit",
    Limit.FILE_SIZE: "file size limit",
    Limit.DISK: "disk limit",
    Limit.PROCESSES: "process limit",
}


@dataclass(frozen=True)
class FunctionTool:
    """A user's function of the call's text, returning the observation's text."""

    function: Callable[[str], str]
    name: str

    def __call__(self, call: str) -> ToolOutput:
        text = self.function(call)
        if not isinstance(text, str):
            raise TypeError(f"returned {type(text).__name__}, not the observation's text (str)")
        return ToolOutput(text)


Tool = Callable[[str], ToolOutput]


def load_tools(config: MultiTurnConfig) -> dict[str, Tool]:
    """The configured tools by the name the policy calls them (`tool_name`); raises ToolError naming a
    tool that cannot be imported or is not callable."""
    tools: dict[str, Tool] = {}
    for entry in config.tools:
        name = tool_name(entry)
        if entry == "python":
            limits = SandboxLimits(wall_seconds=config.tool_seconds, memory_bytes=config.tool_memory_mb * 2**20)
            tools[name] = PythonTool(limits)
            continue
        module_name, _, attribute = entry.partition(":") if ":" in entry else entry.rpartition(".")
        if not module_name or not attribute:
            raise ToolError(
                f"rollout.multi_turn.tools: {entry!r} is neither 'python' nor a dotted path 'package.module:function'"
            )
        try:
            function = getattr(importlib.import_module(module_name), attribute)
        except Exception as error:  # an import may raise anything
            raise ToolError(
                f"rollout.multi_turn.tools: cannot load {entry!r}: {type(error).__name__}: {error}"
            ) from error
        if not callable(function):
            raise ToolError(f"rollout.multi_turn.tools: {entry!r} is a {type(function).__name__}, not a function")
        tools[name] = FunctionTool(function, name)
    return tools


def call_tool(tool: Tool, call: str, *, max_chars: int) -> ToolOutput:
    """`tool(call)` with its text cut to `max_chars` (and flagged so), never raising: a tool that raises
    gives outcome "raised" with the error, observed by the policy as a tool failure."""
    try:
        output = tool(call)
    except Exception as error:  # a user's tool may raise anything; the trajectory goes on
        message = f"{type(error).__name__}: {error}"
        return ToolOutput("error: the tool failed", outcome="raised", error=message)
    if len(output.text) > max_chars:
        cut = f"{output.text[:max_chars]}\n[output cut at {max_chars} of {len(output.text)} characters]"
        return ToolOutput(cut, outcome=output.outcome, error=output.error)
    return output
