"""maild's benchmark: maild beside a do-nothing aiosmtpd server, same client, one run.

    python -m bench [--quick] [--database-url URL] [--out DIR]

`bench.run` drives it; `bench.client` is the SMTP load generator (aiosmtplib),
`bench.servers` starts the servers and watches their memory, `bench.reference`
is the reference server, `bench.fill` fills a database with stored mail for the
scale rows. docs/benchmarks.md explains every figure.
"""
