"""cpsl-edge toolkit: the library shared by the profiler, the device agent and the edge server.

Subpackages each do one job: ``models`` (layered models and cuts), ``profiler``
(measurements on the hardware it runs on), ``profile_format`` (the versioned
JSON the profiler writes and everything else reads).
"""

__version__ = "0.1.0"
