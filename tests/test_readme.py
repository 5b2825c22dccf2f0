"""The README's set-up commands and component table stay true."""
import re
from pathlib import Path

from tpo.registry import ALL_REGISTRIES, registered_names

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _bash_blocks():
    return re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)


def test_exactly_two_setup_commands_and_ci_runs_the_test_one():
    blocks = _bash_blocks()
    assert len(blocks) == 2, blocks
    ci = (ROOT / ".ci" / "run").read_text()
    assert blocks[1].strip() in ci


def test_component_table_lists_every_registered_component():
    for name, registry in ALL_REGISTRIES.items():
        row = next((line for line in README.splitlines() if line.startswith(f"| {name} |")), None)
        assert row is not None, f"README table has no row for {name}"
        listed = set(re.findall(r"`(\w+)`", row))
        ours = {n for n in registered_names(registry) if registry.module_dict[n].__module__.startswith("tpo.")}
        missing = ours - listed  # components the tests register themselves are not the library's
        assert not missing, f"README table row {name} misses {sorted(missing)}"
