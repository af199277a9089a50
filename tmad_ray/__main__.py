from tmad_ray.cli import main

raise SystemExit(main())
