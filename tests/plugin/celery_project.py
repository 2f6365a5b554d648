APP = ""
