"""botline's processes: the HTTP gateway, the model worker and the `botline` command."""
