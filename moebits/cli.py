"""``moebits SUB [args]``: one console entry point whose sub-commands mirror the packages.

``moebits sim [hydra overrides]``, ``moebits runtime [hydra overrides]``,
``moebits traces import|stats|synth|capture|info ...``, ``moebits analysis report|study ...``.
Each is the same as ``python -m moebits.SUB ...``.
"""

from __future__ import annotations

import importlib
import sys

# sub-command -> (module whose main() runs it, one line of help)
COMMANDS = {
    "sim": ("moebits.sim.app", "replay a workload under a policy in the simulator (hydra overrides)"),
    "runtime": ("moebits.runtime.app", "run a policy live on real tensors, GPU or CPU (hydra overrides; needs the gpu extra)"),
    "traces": ("moebits.traces.__main__", "import, inspect, synthesize and capture routing traces"),
    "analysis": ("moebits.analysis.__main__", "prepare the study's traces, report sweeps, run the study"),
}


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
    module = importlib.import_module(COMMANDS[name][0])
    sys.argv = [f"moebits {name}", *rest]  # hydra and argparse read sys.argv
    result = module.main() if name in ("sim", "runtime") else module.main(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
