"""Select adds only `selected` and `reject_reason`, from thresholds in config."""
import pyarrow as pa

from curation.config import SelectConfig
from curation.select import select_batch


def test_thresholds_and_reasons():
    t = pa.table({
        "key": ["a", "b", "c", "d", "e", "f"],
        "status": ["ok", "ok", "ok", "ok", "failed_download", "ok"],
        "width": [2000, 500, 1024, 1024, None, 1100],
        "height": [1500, 2000, 4700, 1024, None, 1100],
        "aesthetic": [6.0, 7.0, 6.0, 4.0, None, 6.5],
        "duplicate_of": [None, None, None, None, None, "a"],
    })
    out = select_batch(t, SelectConfig(min_side=1024, max_aspect_ratio=4.5, aesthetic_min=5.0))
    assert out.column_names == ["key", "selected", "reject_reason"]
    assert out.column("selected").to_pylist() == [True, False, False, False, False, False]
    assert out.column("reject_reason").to_pylist() == [
        None, "too_small", "aspect_ratio", "low_aesthetic", "failed_download", "duplicate"]
    # b: h/w = 4.0 passes the ratio, fails min side; c: 4.59 > 4.5
    loose = select_batch(t, SelectConfig(min_side=0, max_aspect_ratio=5.0, aesthetic_min=None, drop_duplicates=False))
    assert loose.column("selected").to_pylist() == [True, True, True, True, False, True]
