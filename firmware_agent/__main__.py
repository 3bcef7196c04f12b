from firmware_agent.cli import main

raise SystemExit(main())
