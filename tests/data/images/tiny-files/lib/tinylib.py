GREETING = "hi from tinylib"
