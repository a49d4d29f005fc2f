"""cxrscale preprocessing: radiographs in, validated and patient-split TFRecord shards out.

`python -m preprocessing --help` for the command line; `prepare` for the same from Python;
`schema.dataset(prepared_dir, split)` to read the shards; `transform.transform` for the pixel transform
shared by preparation and prediction.
"""
from cxrscale.errors import CxrError

__all__ = ["CxrError"]
