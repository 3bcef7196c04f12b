from edge_server.entry import main

raise SystemExit(main())
