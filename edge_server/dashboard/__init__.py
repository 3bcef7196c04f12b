"""The run, drawn: a live dashboard served by the edge server (``--dashboard``) and a static
report of a finished run (``edge_server report``).

- ``view``: pure functions from round records and the fleet to the JSON both pages draw;
- ``feed``: the live view of a running server, read from its records and registry;
- ``web``: the aiohttp server (page, server-sent events, token on non-loopback addresses);
- ``report``: one self-contained HTML file from a run directory;
- ``static/``: the page, its script and Chart.js (MIT), served or inlined as they are.
"""
