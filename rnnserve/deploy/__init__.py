"""Deployments beyond one process: ``ray_serve`` runs engine replicas behind one OpenAI endpoint."""
