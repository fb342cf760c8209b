from grokgate.cli import main

raise SystemExit(main())
