"""Install the vLLM release that goes with the installed torch, never replacing torch.

vLLM's compiled kernels link libtorch, so every release pins one torch exactly; installing
another release would replace torch (and a CUDA build with it). This picks the newest release
below whose pin is the installed torch and whose transformers range admits the installed
transformers, and installs it with pip constraints that hold both where they are.
``WITH_VLLM=1 bash scripts/setup.sh`` calls it; ``--dry_run`` prints the pip command only.

    python scripts/vllm_for_torch.py --dry_run
    python scripts/vllm_for_torch.py --torch 2.11.0+cu130 --transformers 5.24.0 --dry_run
"""

import argparse
import os
import subprocess
import sys
import tempfile

# vLLM release -> (its torch pin, its transformers range), read from each wheel's METADATA
# (Requires-Dist) on PyPI on 2026-12-03; only releases read are listed.
VLLM_RELEASES = {
    "0.25.1": ("2.11.0", ">=5.5.3"),
    "0.26.0": ("2.11.0", ">=5.5.3"),
    "0.27.0": ("2.13.0", ">=5.5.3"),
    "0.30.0": ("2.13.0", ">=5.10.4"),
    "0.31.0": ("2.13.0", ">=5.10.4,<5.18.0"),
    "0.32.0": ("2.13.0", ">=5.16.1,<5.20.0"),
    "0.33.0": ("2.14.0", ">=5.16.1,<5.21.0"),
    "0.34.0": ("2.14.0", ">=5.16.1,<5.23.0"),
}


class NoMatch(Exception):
    pass


def _release_key(version: str) -> tuple:
    return tuple(int(part) for part in version.split("."))


def vllm_for(torch_version: str, transformers_version: str) -> str:
    """The newest release in ``VLLM_RELEASES`` for this torch (local label such as +cu130 aside)
    and transformers; ``NoMatch`` (one line) when there is none or torch is a CPU build."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    base, _, local = torch_version.partition("+")
    if local == "cpu":
        raise NoMatch(f"vLLM needs a CUDA build of torch; the installed torch is {torch_version}")
    fitting = [release for release, (pin, _) in VLLM_RELEASES.items() if pin == base]
    if not fitting:
        pins = ", ".join(sorted({pin for pin, _ in VLLM_RELEASES.values()}))
        raise NoMatch(f"no known vLLM release requires torch {base} (known pins: {pins}; scripts/vllm_for_torch.py)")
    admitting = [r for r in fitting if Version(transformers_version) in SpecifierSet(VLLM_RELEASES[r][1])]
    if not admitting:
        ranges = "; ".join(f"{r}: transformers{VLLM_RELEASES[r][1]}" for r in fitting)
        raise NoMatch(f"no known vLLM release for torch {base} accepts the installed transformers "
                      f"{transformers_version} ({ranges})")
    return max(admitting, key=_release_key)


def pip_command(python: str, release: str, constraints_path: str) -> list[str]:
    return [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", f"vllm=={release}",
            "-c", constraints_path]


def installed(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def main(argv) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch", default=None, help="torch version to match (default: the installed one)")
    parser.add_argument("--transformers", default=None, help="transformers version to keep (default: the installed one)")
    parser.add_argument("--dry_run", action="store_true", help="print the pip command and the constraints; install nothing")
    args = parser.parse_args(argv)
    torch_version = args.torch or installed("torch")
    transformers_version = args.transformers or installed("transformers")
    if not torch_version or not transformers_version:
        print("error: install torch and transformers first (bash scripts/setup.sh)", file=sys.stderr)
        return 2
    try:
        release = vllm_for(torch_version, transformers_version)
    except NoMatch as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    constraints = f"torch=={torch_version}\ntransformers=={transformers_version}\n"
    print(f"== installing vllm=={release} (pins torch {VLLM_RELEASES[release][0]}); "
          f"keeping torch {torch_version} and transformers {transformers_version}")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "constraints.txt")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(constraints)
        command = pip_command(sys.executable, release, path)
        if args.dry_run:
            print(" ".join(command))
            print(constraints, end="")
            return 0
        return subprocess.run(command).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
