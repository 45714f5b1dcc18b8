"""How a ``Kit`` shows itself in a notebook (``_repr_html_``): reference, digest, format,
created, and a table of the layers (kind, path, layout and compression, size, verification
state, digest). Every value is escaped: paths and names come from the kit, which may be
hostile."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kitfs.api.kit import Layer

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_size(size_bytes: int) -> str:
    """``1536`` → ``1.5 KiB``."""
    value = float(size_bytes)
    for unit in _UNITS:
        if value < 1024 or unit == _UNITS[-1]:
            return f"{size_bytes} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _cell(text: object, title: object = None) -> str:
    attribute = f' title="{html.escape(str(title))}"' if title is not None else ""
    return f"<td{attribute}>{html.escape(str(text))}</td>"


def kit_html(reference: str, digest: str, family: str, created: str | None,
             layers: list[Layer]) -> str:
    total = sum(layer.size for layer in layers)
    rows = []
    for layer in layers:
        layout = layer.layout if layer.compression == "none" else f"{layer.layout}+{layer.compression}"
        rows.append("<tr>" + "".join([
            _cell(layer.kind), _cell(layer.path), _cell(layout),
            _cell(human_size(layer.size), f"{layer.size} bytes"), _cell(layer.verification),
            f"<td><code>{html.escape(layer.digest)}</code></td>",
        ]) + "</tr>")
    return (
        '<div class="kitfs-kit">'
        f"<p><b>ModelKit</b> <code>{html.escape(reference)}</code></p>"
        "<table>"
        f"<tr><th>digest</th><td><code>{html.escape(digest)}</code></td></tr>"
        f"<tr><th>format</th>{_cell(family)}</tr>"
        f"<tr><th>created</th>{_cell(created or '-')}</tr>"
        f"<tr><th>layers</th>{_cell(f'{len(layers)}, {human_size(total)}', f'{total} bytes')}</tr>"
        "</table>"
        "<table><thead><tr><th>kind</th><th>path</th><th>layout</th><th>size</th>"
        "<th>verification</th><th>digest</th></tr></thead><tbody>"
        + "".join(rows) + "</tbody></table></div>"
    )
