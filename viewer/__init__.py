"""The real-time novel-pose viewer: ``avatar-viewer PATH`` serves a viser web app (bound to 127.0.0.1 by default)
that poses a fitted avatar bundle on the CPU (``viewer.posing``) and lets the browser draw the splats.

Modules: ``posing`` (bundle + pose -> packed splats, skeleton, mesh, posed .ply), ``motions`` (motion files, SMPL
retargeting, presets, the shipped walk), ``app`` (CLI, scene and GUI). See ``viewer/design.md``.
"""
