"""The facts an exported graph carries (metadata_props under the "fastguide." prefix, values as JSON)."""
from __future__ import annotations

import json
from pathlib import Path

FORMAT = "fastguide.onnx/1"
META_PREFIX = "fastguide."  # prefix of our metadata_props keys
# A multistep plan's step graph takes its K history slots [K, B, C, H, W] as "history" and returns them updated as
# "history_next" (metadata "history_slots": K; absent in files written before multistep export, meaning 0); the
# loop graph carries them in the ONNX Loop's state, zero at the start.
HISTORY_INPUT, HISTORY_OUTPUT = "history", "history_next"


def set_metadata(proto, meta: dict) -> None:
    import onnx

    kept = [p for p in proto.metadata_props if not p.key.startswith(META_PREFIX)]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    onnx.helper.set_model_props(proto, {**{p.key: p.value for p in kept},
                                        **{META_PREFIX + k: json.dumps(v) for k, v in meta.items()}})


def read_metadata(session_or_path) -> dict:
    """The fastguide facts an exported graph carries (mode, steps, latent_shape, ...), decoded from JSON."""
    if isinstance(session_or_path, (str, Path)):
        import onnx

        path = Path(session_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"path: ONNX file {path} not found")
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # protobuf's DecodeError and friends
            raise ValueError(f"path: {path} is not an ONNX graph ({str(e).splitlines()[0][:200]})") from None
        return proto_metadata(proto)
    return decode_metadata(session_or_path.get_modelmeta().custom_metadata_map)


def proto_metadata(proto) -> dict:
    return decode_metadata({p.key: p.value for p in proto.metadata_props})


def decode_metadata(props: dict) -> dict:
    try:
        meta = {k[len(META_PREFIX):]: json.loads(v) for k, v in props.items() if k.startswith(META_PREFIX)}
    except ValueError as e:
        raise ValueError(f"path: the graph's fastguide metadata does not parse ({e})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"path: not a graph written by fastguide.onnx.export (format {meta.get('format')!r}, "
                         f"expected {FORMAT!r})")
    return meta
