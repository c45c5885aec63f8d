"""Reading a grid or trial file: a bounded regular file, UTF-8, parsed by yaml.safe_load's
loader with duplicate keys refused and nesting and expansion bounded. No code runs from a
config: no Python tags, no model code (validation reads a model's config.json as JSON)."""

from __future__ import annotations

from pathlib import Path

import yaml

from factorllm_core.options import short


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load, but a key given twice in one mapping is an error (PyYAML keeps
    the last one silently, so a typo'd override would vanish), and nesting is bounded
    while the document is composed (PyYAML composes recursively: thousands of levels
    end in RecursionError)."""

    _depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(
                    None, None, f"nested more than {MAX_YAML_DEPTH} levels deep; a grid or trial file needs a few", mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _mapping_without_duplicates(loader, node, deep=False):
    """Merge keys (`<<: *base`) merge as in yaml.safe_load, the mapping's own keys overriding the
    merged ones; a key written twice in the mapping itself is refused."""
    keys = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # construct_mapping merges it
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, (str, int, float, bool)):
            continue  # construct_mapping itself rejects unhashable keys
        if key in keys:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {short(key, 80)}", key_node.start_mark)
        keys.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)

MAX_YAML_NODES = 100_000  # far above any real grid; stops alias "bombs" before anything walks them
MAX_YAML_DEPTH = 32  # the deepest real grid nests 4 levels
MAX_CONFIG_BYTES = 1 << 20  # the largest shipped grid is ~6 KB


def read_config_text(path: str | Path) -> str:
    """A grid or trial file's text: a regular file of at most MAX_CONFIG_BYTES, UTF-8. Checked
    before it is parsed (reading at most one byte past the bound), so a huge file or a device
    is refused at once. Raises ValueError (the caller names the file)."""
    path = Path(path)
    if not path.exists():
        raise ValueError("no such file")
    if not path.is_file():
        raise ValueError("not a regular file (a folder or a device); give a .yaml file")
    with open(path, "rb") as f:
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ValueError(f"larger than {MAX_CONFIG_BYTES >> 20} MB; a grid or trial file is a few KB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"not UTF-8 text (byte {error.start}); is it a YAML file?") from None


def load_yaml(text: str):
    """Parse config YAML safely (no code, no duplicate keys, bounded size). Raises
    yaml.YAMLError or ValueError with a short message."""
    data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    _check_size(data)
    return data


def _check_size(data) -> None:
    """Count nodes as the structure is walked (aliases count each time they are reached)."""
    stack, seen = [data], 0
    while stack:
        item = stack.pop()
        seen += 1
        if seen > MAX_YAML_NODES:
            raise ValueError(
                f"the YAML expands to more than {MAX_YAML_NODES:,} values (nested aliases?); "
                "a grid or trial file is far smaller"
            )
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
