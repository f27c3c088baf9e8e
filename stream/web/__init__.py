"""TRAIL's web face, served by the worker's own Faust web server (TRAIL_WEB_PORT).

    reader.py    what the pages show, read from the results store (parameters bound; off the loop)
    views.py     server-rendered HTML with inline SVG charts (no JavaScript, no build step)
    routes.py    the aiohttp routes: pages, /api/*, /metrics, /health, /ready; `install(app, ...)`
    metrics.py   the Prometheus series, read from the running parts at scrape time
    sql/         queries the dashboards in deploy/dashboards/ do not have (NDCG@10 of a ranking)
"""
