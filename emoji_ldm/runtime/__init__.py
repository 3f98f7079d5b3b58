"""Process and cluster set-up, one module per concern: `connect` (joining or starting Ray, with the settings
of Ray Data and Ray's daemons), `heap` (handing a worker's freed memory back), `partitions` (shuffle sizing),
`shared` (refusing local paths that other nodes cannot reach)."""
