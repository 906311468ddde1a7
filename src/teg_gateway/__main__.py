from teg_gateway.cli import main

raise SystemExit(main())
