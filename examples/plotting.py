"""Figures for the examples and benchmarks: file-only matplotlib."""


def pyplot():
    """`matplotlib.pyplot` on the Agg backend (writes files, needs no display).

    matplotlib comes with the `examples` extra; ImportError without it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path):
    """Lays out, writes a PNG at 100 dpi and frees the figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
