"""Replicas of the engine behind one OpenAI endpoint on Ray Serve (`actserve serve-ray`, deploy/ray/).

options.py (what a deployment is made of), routing.py (what a request's affinity is: its prompt prefix
and interventions, read from the body), asgi.py (the server app called in-process by a replica),
router.py (Ray Serve's request-router extension: warm replica first, else the least loaded), app.py (the
deployments and the application builder). Only router.py and app.py import Ray."""
