"""The loss-curve image a job writes next to its adapter: a 700x400 PNG with the training loss, the
validation loss per epoch and the base model's validation loss, the same bytes for the same numbers."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from lunatrain.progress import _nice_ticks, plot_loss_curve

TRAIN, VAL, BASE = (31, 119, 180), (255, 127, 14), (128, 128, 128)
CURVE = [{"step": i, "loss": 3.0 - 0.01 * i} for i in range(1, 121)]
EPOCHS = [{"step": 60, "valLoss": 2.5}, {"step": 120, "valLoss": 2.2}]


def near(pixel: tuple[int, ...], colour: tuple[int, int, int], tolerance: int = 12) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, colour, strict=False))


def pixels_of(image: Image.Image, colour: tuple[int, int, int]) -> list[tuple[int, int]]:
    """Where the plot area (inside the axes, the legend in its upper right corner left out) has this colour."""
    rgb = image.convert("RGB")
    return [
        (x, y)
        for y in range(40, 350)
        for x in range(80, 680)
        if not (x > 480 and y < 115) and near(rgb.getpixel((x, y)), colour)
    ]


def test_the_curve_shows_each_series_where_its_numbers_are(tmp_path: Path):
    path = plot_loss_curve(tmp_path / "a" / "loss-curve.png", CURVE, EPOCHS, 2.9, title="luna-adapter")
    image = Image.open(path)
    assert image.format == "PNG" and image.size == (700, 400)
    train, val, base = (pixels_of(image, c) for c in (TRAIN, VAL, BASE))
    assert len(train) > 300 and len(val) > 50 and len(base) > 100
    # the training loss falls: its left end is drawn higher (smaller y) than its right end (below the legend)
    left = [y for x, y in train if x < 100]
    right = [y for x, y in train if x > 530]
    assert left and right and max(left) < min(right)
    # the base line (2.9) lies above the validation points (2.5, 2.2): smaller y, and dashed, not solid
    base_rows = {y for _, y in base}
    assert max(base_rows) < min(y for _, y in val)
    row = min(base_rows, key=lambda r: -sum(1 for _, y in base if y == r))
    xs = sorted(x for x, y in base if y == row)
    assert any(b - a > 5 for a, b in zip(xs, xs[1:], strict=False)), "the base line has no gaps"


def test_the_same_numbers_give_the_same_bytes(tmp_path: Path):
    a = plot_loss_curve(tmp_path / "a.png", CURVE, EPOCHS, 2.9, title="x").read_bytes()
    b = plot_loss_curve(tmp_path / "b.png", CURVE, EPOCHS, 2.9, title="x").read_bytes()
    c = plot_loss_curve(tmp_path / "c.png", CURVE[:-1], EPOCHS, 2.9, title="x").read_bytes()
    assert a == b and a != c


def test_short_empty_and_non_finite_runs_still_give_an_image(tmp_path: Path):
    cases = {
        "empty": ([], [], None),
        "one step": ([{"step": 1, "loss": 2.0}], [], None),
        "base only": ([], [], 3.0),
        "flat": ([{"step": s, "loss": 2.0} for s in (1, 2, 3)], [{"step": 3, "valLoss": 2.0}], 2.0),
        "non-finite": ([{"step": 1, "loss": float("nan")}, {"step": 2, "loss": float("inf")}], [], float("nan")),
    }
    for name, (curve, epochs, base) in cases.items():
        image = Image.open(plot_loss_curve(tmp_path / f"{name}.png", curve, epochs, base))
        assert image.size == (700, 400), name
    assert pixels_of(Image.open(tmp_path / "one step.png"), TRAIN), "the one point"


def test_ticks_are_round_and_steps_whole():
    assert _nice_ticks(0.0, 10.0) == [0, 2, 4, 6, 8, 10]
    assert _nice_ticks(2.93, 3.12) == [2.95, 3.0, 3.05, 3.1]
    assert _nice_ticks(0.9, 3.1, whole=True) == [1, 2, 3]
    assert _nice_ticks(5.0, 5.0) == [5.0, 5.2, 5.4, 5.6, 5.8, 6.0]  # an empty range: one unit


def test_a_long_name_in_the_title_stays_inside_the_image(tmp_path: Path):
    image = Image.open(plot_loss_curve(tmp_path / "w.png", CURVE, EPOCHS, 2.9, title="W" * 64)).convert("RGB")
    title_band = [image.getpixel((x, y)) for y in range(2, 30) for x in (0, 1, 2, 697, 698, 699)]
    assert all(p == (255, 255, 255) for p in title_band), "the title runs past the image's edges"
    assert any(p != (255, 255, 255) for p in (image.getpixel((x, 15)) for x in range(40, 660))), "no title"


def test_long_tick_labels_move_the_plot_instead_of_running_past_the_edge(tmp_path: Path):
    """A loss in the millions with a small spread: tick labels like 1234567.80 push the plot right, clear of
    the rotated axis label and the image's edge; ordinary numbers keep the usual layout."""
    huge = [{"step": i, "loss": 1_234_567.8 + 0.01 * (i % 7)} for i in range(1, 41)]
    rows, frames = range(60, 330, 2), {}
    for name, curve, epochs in (("huge", huge, []), ("usual", CURVE, EPOCHS)):
        image = Image.open(plot_loss_curve(tmp_path / f"{name}.png", curve, epochs, None)).convert("RGB")
        ink = [sum(image.getpixel((x, y)) != (255, 255, 255) for y in rows) for x in range(200)]
        frames[name] = frame = next(x for x, n in enumerate(ink) if n > 0.9 * len(rows))  # the plot's left border
        assert ink[0] == ink[1] == 0, f"{name}: something reaches the image's left edge"
        label_end = next((x for x in range(2, frame) if ink[x] == 0 and any(ink[2:x])), None)  # after the axis label
        assert label_end is not None, f"{name}: the axis label runs into the tick labels"
        assert any(ink[label_end : frame - 6]), f"{name}: no tick labels between the axis label and the plot"
    assert frames["usual"] in range(66, 74) and frames["huge"] > frames["usual"] + 10, frames
