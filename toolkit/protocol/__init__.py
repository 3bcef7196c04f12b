"""The wire protocol: topics, typed message bodies, the frame codec, and chunking (docs/protocol.md)."""

from toolkit.protocol.chunking import Reassembler, split
from toolkit.protocol.codec import Message, ProtocolError, decode, encode, make_header
from toolkit.protocol.messages import Kind

__all__ = ["Kind", "Message", "ProtocolError", "Reassembler", "decode", "encode", "make_header", "split"]
