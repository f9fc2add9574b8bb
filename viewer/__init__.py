"""The real-time novel-pose viewer (viser web app, bound to 127.0.0.1 by default); arrives with the viewer issue."""
