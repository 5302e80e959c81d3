"""``moebits SUB [args]``: one console entry point whose sub-commands mirror the packages.

``moebits sim [hydra overrides]``, ``moebits runtime [hydra overrides]``,
``moebits traces import|stats|synth|capture|info ...``, ``moebits train corpus|fit ...``,
``moebits analysis report|study ...``.
Each is the same as ``python -m moebits.SUB ...``.

Two failures are answered in one line instead of a traceback: a missing optional dependency
(``error: ... needs torch: pip install 'moebits[gpu]'``, see :data:`EXTRAS`) and a closed
output pipe (``moebits traces stats T | head``: exits quietly).
"""

from __future__ import annotations

import importlib
import os
import sys

# sub-command -> (module whose main() runs it, one line of help)
COMMANDS = {
    "sim": ("moebits.sim.app", "replay a workload under a policy in the simulator (hydra overrides)"),
    "runtime": ("moebits.runtime.app", "run a policy live on real tensors, GPU or CPU (hydra overrides; needs the gpu extra)"),
    "traces": ("moebits.traces.__main__", "import, inspect, synthesize and capture routing traces"),
    "train": ("moebits.train.__main__", "build the stdlib corpus, train the project's own MoE, measure its quality"),
    "analysis": ("moebits.analysis.__main__", "prepare the study's traces, report sweeps, run the study"),
}


# top-level module of an optional dependency -> the extra of pyproject.toml that installs it
EXTRAS = {
    "torch": "gpu", "transformers": "gpu", "triton": "gpu", "safetensors": "gpu",
    "hydra_plugins.hydra_joblib_launcher": "sweep", "joblib": "sweep",
    "ray": "ray", "hydra_plugins.hydra_ray_launcher": "ray",
    "submitit": "slurm", "hydra_plugins.hydra_submitit_launcher": "slurm",
}


def missing_extra(exc: ModuleNotFoundError) -> str | None:
    """One line naming the extra that installs the missing module, or None if it is not optional."""
    name = exc.name or ""
    for module, extra in EXTRAS.items():
        if name == module or name.startswith(module + "."):
            return f"this command needs {name.split('.')[0] if extra == 'gpu' else module}, which is not installed: " \
                   f"pip install 'moebits[{extra}]'"
    return None


def _quiet_broken_pipe() -> int:
    """The reader of our output went away (``| head``): stop without a traceback."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # Python flushes stdout at exit; let that go nowhere
    return 0


def _usage() -> str:
    lines = ["usage: moebits COMMAND [args...]", "", "commands:"]
    lines += [f"  {name:<10}{text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "'moebits COMMAND --help' explains each command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    sys.argv = [f"moebits {name}", *rest]  # hydra and argparse read sys.argv
    try:
        module = importlib.import_module(COMMANDS[name][0])
        result = module.main() if name in ("sim", "runtime") else module.main(rest)
        sys.stdout.flush()
    except ModuleNotFoundError as exc:
        line = missing_extra(exc)
        if line is None:
            raise
        print(f"error: moebits {name}: {line}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return _quiet_broken_pipe()
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
