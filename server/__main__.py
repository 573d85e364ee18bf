"""`python -m actserve.server ...` is the same as the `actserve` command."""

import sys

from actserve.server.cli import main

sys.exit(main())
