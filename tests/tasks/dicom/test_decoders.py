"""The decoder registry: availability, order, fallbacks and the recorded decoder name."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import UID, JPEG2000Lossless, JPEGBaseline8Bit, RLELossless

import tasks.dicom.pixels as px
from model.spec import PreprocessSpec
from tasks.dicom.decoders import (
    PREFERENCE,
    REGISTRY,
    Backend,
    Decline,
    Decoded,
    DecodeJob,
    PixelLayout,
    Registry,
    check_decodable,
    decode,
)
from tasks.dicom.decoders import registry as registry_module
from tasks.dicom.decoders.pydicom_plugins import PydicomPlugin
from tasks.dicom.outcomes import InputError

SPEC = PreprocessSpec()
LAYOUT = PixelLayout(rows=4, columns=3, bits_allocated=16, bits_stored=12, signed=False)
SYNTAX = UID(JPEG2000Lossless)


class Fake(Backend):
    """A backend that records its calls and does what it is told."""

    def __init__(self, name, *, value=1, missing=None, error=None, reduced=False, syntaxes=None):
        self.name = name
        self.syntaxes = frozenset(syntaxes or {SYNTAX})
        self.reduced = reduced
        self.value, self.missing, self.error = value, missing, error
        self.calls = 0

    def unavailable(self, tsyntax):
        return self.missing

    def decode(self, job: DecodeJob) -> Decoded:
        self.calls += 1
        if self.error is not None:
            raise self.error
        shape = (2, 2) if self.reduced else (LAYOUT.rows, LAYOUT.columns)
        return Decoded(np.full(shape, self.value, np.uint16), self.name, reduce_level=self.reduced)


def dataset(syntax=SYNTAX) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = b"\xfe\xff\x00\xe0\x00\x00\x00\x00\xfe\xff\x00\xe0\x04\x00\x00\x00abcd"
    return ds


def run(registry, min_shape=None, syntax=SYNTAX):
    return decode(dataset(syntax), syntax, LAYOUT, min_shape=min_shape, registry=registry)


def test_an_unavailable_backend_is_skipped_and_the_next_one_used():
    first = Fake("first", value=1, missing="first - requires firstlib")
    second = Fake("second", value=2)
    registry = Registry([second, first], {SYNTAX: ("first", "second")})
    out = run(registry)
    assert out.decoder == "second" and int(out.array[0, 0]) == 2
    assert first.calls == 0 and second.calls == 1
    assert "decoders_failed" not in out.notes


def test_preference_order_then_the_others_by_name():
    backends = [Fake(n) for n in ("zeta", "alpha", "fast", "mid")]
    registry = Registry(backends, {SYNTAX: ("fast", "mid")})
    names = [b.name for b in registry.handling(SYNTAX, reduced=False)]
    assert names == ["fast", "mid", "alpha", "zeta"]
    assert run(registry).decoder == "fast"


def test_a_failing_backend_is_recorded_and_the_next_one_used():
    broken = Fake("broken", error=RuntimeError("corrupt\n  codestream"))
    registry = Registry([broken, Fake("good", value=3)], {SYNTAX: ("broken", "good")})
    out = run(registry)
    assert out.decoder == "good"
    assert out.notes["decoders_failed"] == ["broken: corrupt codestream"]


def test_every_backend_failing_combines_their_messages():
    registry = Registry(
        [Fake("a", error=ValueError("bad a")), Fake("b", error=OSError("bad b"))],
        {SYNTAX: ("a", "b")},
    )
    with pytest.raises(InputError) as info:
        run(registry)
    assert str(info.value) == (
        "decoding JPEG 2000 Image Compression (Lossless Only) pixel data failed with every "
        "available decoder: a: bad a; b: bad b"
    )


def test_an_input_error_from_a_backend_stops_the_search():
    later = Fake("later")
    registry = Registry(
        [Fake("strict", error=InputError("unusable data")), later], {SYNTAX: ("strict", "later")}
    )
    with pytest.raises(InputError, match="^unusable data$"):
        run(registry)
    assert later.calls == 0


def test_no_backend_for_the_syntax_or_none_available():
    with pytest.raises(InputError, match=r"\(0002,0010\) 'Transfer Syntax UID' .* not supported"):
        check_decodable(UID("1.2.3.4.5.6"), Registry([Fake("x")], {}))
    registry = Registry([Fake("x", missing="x - requires xlib")], {})
    with pytest.raises(InputError) as info:
        check_decodable(SYNTAX, registry)
    assert str(info.value).endswith(
        "cannot be decoded: no decoder plugin is available (x - requires xlib)"
    )


def test_reduced_route_first_and_its_decline_recorded():
    small = Fake("small", value=9, reduced=True)
    full = Fake("full", value=4)
    registry = Registry([full, small], {})
    out = run(registry, min_shape=(2, 2))
    assert out.decoder == "small" and out.array.shape == (2, 2) and full.calls == 0
    # not asked for a smaller image: the reduced route is not tried
    assert run(registry).decoder == "full" and small.calls == 1

    small.error = Decline("no level small enough")
    out = run(registry, min_shape=(2, 2))
    assert out.decoder == "full" and out.notes["reduced_fallback"] == "no level small enough"
    small.error = RuntimeError("broken stream")
    out = run(registry, min_shape=(2, 2))
    assert out.notes["reduced_fallback"] == "RuntimeError: broken stream"


def test_an_unavailable_reduced_route_says_so_and_full_resolution_is_used():
    small = Fake("small", reduced=True, missing="Pillow was built without OpenJPEG")
    out = run(Registry([Fake("full"), small], {}), min_shape=(2, 2))
    assert out.decoder == "full" and small.calls == 0
    assert out.notes["reduced_fallback"] == (
        "no reduced-resolution decoder is available: Pillow was built without OpenJPEG"
    )


def test_stored_bits_are_corrected_whatever_the_backend():
    registry = Registry([Fake("high", value=0xFFFF)], {})
    out = run(registry)
    assert out.high_bits_masked and int(out.array.max()) == 0x0FFF


def test_names_are_unique_and_the_preference_table_names_registered_backends():
    registered = {b.name for b in REGISTRY.backends}
    assert registered >= {"native", "pylibjpeg", "gdcm", "pillow", "pillow-j2k-reduce"}
    listed = {name for names in PREFERENCE.values() for name in names}
    assert listed <= registered, listed - registered
    with pytest.raises(ValueError, match="new name"):
        REGISTRY.register(Fake("native"))


def test_default_order_is_the_measured_one():
    def order(syntax, reduced=False):
        return [b.name for b in REGISTRY.pick(UID(syntax), reduced=reduced)[0]]

    assert order(JPEG2000Lossless, reduced=True) == ["pillow-j2k-reduce"]
    assert order(JPEG2000Lossless) == ["pylibjpeg", "gdcm", "pillow"]
    assert order(JPEGBaseline8Bit, reduced=True) == ["pillow-jpeg-draft"]
    assert order(JPEGBaseline8Bit) == ["pillow", "pylibjpeg", "gdcm"]
    assert order(RLELossless) == ["pylibjpeg", "pydicom"]


class Missing(PydicomPlugin):
    """A real pydicom plugin, reported unavailable (as when its package is not installed)."""

    def unavailable(self, tsyntax):
        return f"{self.name} - requires a package that is not installed"


def test_the_recorded_decoder_is_the_backend_that_decoded(monkeypatch):
    path = get_testdata_file("RG1_J2KR.dcm")  # chest CR, JPEG 2000 lossless
    usual = px.preprocess(path, SPEC, reduced=False)
    assert usual.facts["decoder"] == "pylibjpeg"
    backends = [Missing("pylibjpeg") if b.name == "pylibjpeg" else b for b in REGISTRY.backends]
    monkeypatch.setattr(registry_module, "REGISTRY", Registry(backends, PREFERENCE))
    res = px.preprocess(path, SPEC, reduced=False)
    assert res.facts["decoder"] == "gdcm"  # the next in the measured order
    assert np.array_equal(res.image, usual.image)
    red = px.preprocess(path, SPEC, reduced=True)
    assert red.facts["decoder"] == "pillow-j2k-reduce" and red.facts["reduce_level"] > 0
